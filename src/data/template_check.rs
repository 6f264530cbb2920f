//! Checks a chat template (code from a model file) before minijinja compiles it, against the two
//! ways a template crashed qtune instead of failing (found by the `chat_template` fuzzer and by
//! hand, issue #19; minijinja 2.24 has no limit for either):
//!
//! - **Long operator chains.** minijinja's parser and compiler recurse once per operator of an
//!   expression: `{{ ----…1 }}`, `a ~ a ~ …`, `x|f|f|…`, `x.a.a…`, `x()()…` of 5-8 thousand
//!   operators overflow a 2 MiB thread's stack (SIGSEGV, no error). Its own depth limit (150)
//!   covers only brackets and nested blocks. We refuse a tag of more than [`MAX_TAG_TOKENS`]
//!   tokens before the parser sees it.
//! - **A namespace inside itself.** `{% set ns.me = ns %}` (or `[ns]`, an alias, `namespace(a=ns)`)
//!   makes a cycle that printing, `~` or `tojson` follow until the stack overflows. We
//!   accept a namespace only where it cannot be stored: bound by `{% set name = namespace(…) %}`
//!   (or `with`), then used as `name.attr`, `name[key]` and `{% set name.attr = … %}`, which is
//!   how chat templates use it. `import` (a module's attributes could be namespaces) is refused.
use super::template_limits::MAX_VALUE;
use minijinja::machinery::{ast, parse, tokenize, Span, Token, WhitespaceConfig};
use minijinja::syntax::SyntaxConfig;
use std::collections::HashSet;

/// Most tokens in one `{{ … }}` or `{% … %}` tag. The templates we know have tags of tens of
/// tokens; the worst chain this allows fits easily in a 2 MiB stack (test
/// `the_worst_allowed_tag_fits_in_2_mib`).
pub const MAX_TAG_TOKENS: usize = 500;

/// How transformers compiles chat templates (`trim_blocks`, `lstrip_blocks`).
pub(crate) fn whitespace() -> WhitespaceConfig {
    WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    }
}

/// `Err(message)` names the line and the construct; `Ok` when the template is safe to hand to
/// minijinja (a syntax error is left to minijinja's compiler, which reports it with its line).
pub(crate) fn check(source: &str) -> Result<(), String> {
    // Tokens so far in the open tag (None: outside a tag).
    let mut in_tag: Option<usize> = None;
    for tok in tokenize(source, false, SyntaxConfig, whitespace()) {
        let Ok((tok, span)) = tok else { break };
        match (tok, &mut in_tag) {
            (Token::VariableStart | Token::BlockStart, _) => in_tag = Some(0),
            (Token::VariableEnd | Token::BlockEnd, _) => in_tag = None,
            (_, Some(n)) => {
                *n += 1;
                if *n > MAX_TAG_TOKENS {
                    return Err(format!(
                        "chat template line {}: a tag of more than {MAX_TAG_TOKENS} tokens; \
                         minijinja recurses once per operator and could overflow the stack \
                         (split the expression with {{% set %}})",
                        span.start_line
                    ));
                }
            }
            _ => {}
        }
    }
    let Ok(root) = parse(source, "chat", SyntaxConfig, whitespace()) else {
        return Ok(());
    };
    let mut names = HashSet::new();
    collect_namespaces(std::slice::from_ref(&root), &mut names);
    Walk { names }.stmts(std::slice::from_ref(&root))
}

/// `Some(call)` when `e` is `namespace(…)`.
fn namespace_call<'e, 'a>(e: &'e ast::Expr<'a>) -> Option<&'e ast::Call<'a>> {
    match e {
        ast::Expr::Call(c) => match &c.expr {
            ast::Expr::Var(v) if v.id == "namespace" => Some(c),
            _ => None,
        },
        _ => None,
    }
}

/// The names bound to `namespace(…)` anywhere (flow- and scope-insensitive: a name bound to a
/// namespace once is treated as one everywhere).
fn collect_namespaces<'a>(stmts: &[ast::Stmt<'a>], out: &mut HashSet<&'a str>) {
    use ast::Stmt as S;
    for s in stmts {
        match s {
            S::Template(t) => collect_namespaces(&t.children, out),
            S::ForLoop(f) => {
                collect_namespaces(&f.body, out);
                collect_namespaces(&f.else_body, out);
            }
            S::IfCond(i) => {
                collect_namespaces(&i.true_body, out);
                collect_namespaces(&i.false_body, out);
            }
            S::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    if let (ast::Expr::Var(v), Some(_)) = (target, namespace_call(value)) {
                        out.insert(v.id);
                    }
                }
                collect_namespaces(&w.body, out);
            }
            S::Set(set) => {
                if let (ast::Expr::Var(v), Some(_)) = (&set.target, namespace_call(&set.expr)) {
                    out.insert(v.id);
                }
            }
            S::SetBlock(b) => collect_namespaces(&b.body, out),
            S::AutoEscape(a) => collect_namespaces(&a.body, out),
            S::FilterBlock(f) => collect_namespaces(&f.body, out),
            S::Block(b) => collect_namespaces(&b.body, out),
            S::Macro(m) => collect_namespaces(&m.body, out),
            S::CallBlock(c) => collect_namespaces(&c.macro_decl.body, out),
            S::EmitExpr(_)
            | S::EmitRaw(_)
            | S::Import(_)
            | S::FromImport(_)
            | S::Extends(_)
            | S::Include(_)
            | S::Continue(_)
            | S::Break(_)
            | S::Do(_) => {}
        }
    }
}

struct Walk<'a> {
    names: HashSet<&'a str>,
}

fn refuse<T>(span: Span, what: String) -> Result<T, String> {
    Err(format!("chat template line {}: {what}", span.start_line))
}

impl<'a> Walk<'a> {
    fn stmts(&self, stmts: &[ast::Stmt<'a>]) -> Result<(), String> {
        use ast::Stmt as S;
        for s in stmts {
            match s {
                S::Template(t) => self.stmts(&t.children)?,
                S::EmitExpr(e) => self.expr(&e.expr, false)?,
                S::EmitRaw(_) | S::Continue(_) | S::Break(_) => {}
                S::ForLoop(f) => {
                    // The target binds names; it is not a use.
                    self.expr(&f.iter, false)?;
                    if let Some(e) = &f.filter_expr {
                        self.expr(e, false)?;
                    }
                    self.stmts(&f.body)?;
                    self.stmts(&f.else_body)?;
                }
                S::IfCond(i) => {
                    self.expr(&i.expr, false)?;
                    self.stmts(&i.true_body)?;
                    self.stmts(&i.false_body)?;
                }
                S::WithBlock(w) => {
                    for (target, value) in &w.assignments {
                        self.binding(target, value)?;
                    }
                    self.stmts(&w.body)?;
                }
                S::Set(set) => self.binding(&set.target, &set.expr)?,
                S::SetBlock(b) => {
                    self.target(&b.target)?;
                    if let Some(f) = &b.filter {
                        self.expr(f, false)?;
                    }
                    self.stmts(&b.body)?;
                }
                S::AutoEscape(a) => {
                    self.expr(&a.enabled, false)?;
                    self.stmts(&a.body)?;
                }
                S::FilterBlock(f) => {
                    self.expr(&f.filter, false)?;
                    self.stmts(&f.body)?;
                }
                S::Block(b) => self.stmts(&b.body)?,
                S::Import(i) => {
                    return refuse(
                        i.span(),
                        "{% import %} is not allowed in a chat template".into(),
                    )
                }
                S::FromImport(i) => {
                    return refuse(
                        i.span(),
                        "{% from … import %} is not allowed in a chat template".into(),
                    )
                }
                S::Extends(e) => self.expr(&e.name, false)?,
                S::Include(i) => self.expr(&i.name, false)?,
                S::Macro(m) => self.macro_decl(m)?,
                S::CallBlock(c) => {
                    self.call(&c.call, c.call.span())?;
                    self.macro_decl(&c.macro_decl)?;
                }
                S::Do(d) => self.call(&d.call, d.call.span())?,
            }
        }
        Ok(())
    }

    fn macro_decl(&self, m: &ast::Macro<'a>) -> Result<(), String> {
        // The arguments bind names; their defaults are uses.
        for d in &m.defaults {
            self.expr(d, false)?;
        }
        self.stmts(&m.body)
    }

    /// `{% set target = value %}`: `name = namespace(…)` is the one place a namespace may go.
    fn binding(&self, target: &ast::Expr<'a>, value: &ast::Expr<'a>) -> Result<(), String> {
        self.target(target)?;
        match (target, namespace_call(value)) {
            (ast::Expr::Var(_), Some(call)) => self.args(&call.args),
            _ => self.expr(value, false),
        }
    }

    /// An assignment target: names bind; `ns.attr` is an access of `ns`.
    fn target(&self, target: &ast::Expr<'a>) -> Result<(), String> {
        match target {
            ast::Expr::GetAttr(g) => self.expr(&g.expr, true),
            _ => Ok(()),
        }
    }

    fn args(&self, args: &[ast::CallArg<'a>]) -> Result<(), String> {
        for a in args {
            match a {
                ast::CallArg::Pos(e)
                | ast::CallArg::Kwarg(_, e)
                | ast::CallArg::PosSplat(e)
                | ast::CallArg::KwargSplat(e) => self.expr(e, false)?,
            }
        }
        Ok(())
    }

    fn call(&self, c: &ast::Call<'a>, span: Span) -> Result<(), String> {
        if let ast::Expr::Var(v) = &c.expr {
            if v.id == "namespace" {
                return refuse(
                    span,
                    "namespace(…) must be assigned to a name ({% set ns = namespace(…) %})".into(),
                );
            }
        }
        // Calling a value (a macro, `ns.items()`) does not store it.
        self.expr(&c.expr, true)?;
        self.args(&c.args)
    }

    /// `access`: `e` is the object of `.attr`, `[key]` or a call, where a namespace may appear.
    fn expr(&self, e: &ast::Expr<'a>, access: bool) -> Result<(), String> {
        use ast::Expr as E;
        match e {
            E::Var(v) => {
                if v.id == "namespace" {
                    return refuse(
                        v.span(),
                        "`namespace` used as a value; call it as {% set ns = namespace(…) %}"
                            .into(),
                    );
                }
                if !access && self.names.contains(v.id) {
                    return refuse(
                        v.span(),
                        format!(
                            "the namespace `{}` is used as a value; only `{0}.attr`, `{0}[key]` \
                             and {{% set {0}.attr = … %}} are allowed (a namespace stored inside \
                             itself is a cycle that rendering follows until the stack overflows)",
                            v.id
                        ),
                    );
                }
                Ok(())
            }
            E::Const(_) => Ok(()),
            E::Slice(s) => {
                self.expr(&s.expr, false)?;
                for x in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.expr(x, false)?;
                }
                Ok(())
            }
            E::UnaryOp(u) => self.expr(&u.expr, false),
            E::BinOp(b) => {
                if const_size(e).is_some_and(|(n, _)| n > MAX_VALUE) {
                    return refuse(
                        b.span(),
                        format!(
                            "a constant expression of over {} MiB (minijinja would compute it \
                             while compiling the template)",
                            MAX_VALUE >> 20
                        ),
                    );
                }
                self.expr(&b.left, false)?;
                self.expr(&b.right, false)
            }
            E::Compare(c) => {
                self.expr(&c.expr, false)?;
                c.ops.iter().try_for_each(|op| self.expr(&op.expr, false))
            }
            E::IfExpr(i) => {
                self.expr(&i.test_expr, false)?;
                self.expr(&i.true_expr, false)?;
                i.false_expr
                    .as_ref()
                    .map_or(Ok(()), |f| self.expr(f, false))
            }
            E::Filter(f) => {
                if let Some(x) = &f.expr {
                    self.expr(x, false)?;
                }
                self.args(&f.args)
            }
            E::Test(t) => {
                self.expr(&t.expr, false)?;
                self.args(&t.args)
            }
            E::GetAttr(g) => self.expr(&g.expr, true),
            E::GetItem(g) => {
                self.expr(&g.expr, true)?;
                self.expr(&g.subscript_expr, false)
            }
            E::Call(c) => self.call(c, c.span()),
            E::List(l) => l.items.iter().try_for_each(|x| self.expr(x, false)),
            E::Map(m) => m
                .keys
                .iter()
                .chain(&m.values)
                .try_for_each(|x| self.expr(x, false)),
        }
    }
}

/// Bytes of the value minijinja's compiler computes for a constant expression (it folds `'ab' * n`,
/// `c ~ c`, `[…] + […]` whose operands are constants before any size check of ours can run),
/// and whether it is a string or a list (what `*` repeats); `None` when `e` is not constant.
/// Measured without evaluating anything large: only an operand of a few bytes (a number) is
/// evaluated, for the count of a `*`.
fn const_size(e: &ast::Expr) -> Option<(usize, bool)> {
    use ast::Expr as E;
    const SMALL: usize = 16;
    fn sum<'x, 'a: 'x>(mut items: impl Iterator<Item = &'x ast::Expr<'a>>) -> Option<usize> {
        items.try_fold(0usize, |acc, x| {
            Some(acc.saturating_add(const_size(x)?.0).saturating_add(SMALL))
        })
    }
    match e {
        E::Const(c) => Some(match c.value.as_str() {
            Some(s) => (s.len(), true),
            None => (SMALL, false),
        }),
        E::List(l) => Some((sum(l.items.iter())?, true)),
        E::Map(m) => Some((sum(m.keys.iter().chain(&m.values))?, false)),
        E::UnaryOp(u) => const_size(&u.expr).map(|_| (SMALL, false)),
        E::BinOp(b) => {
            let (l, r) = (const_size(&b.left)?, const_size(&b.right)?);
            let count = |x: &ast::Expr, size: (usize, bool)| {
                (!size.1 && size.0 <= SMALL)
                    .then(|| x.as_const().and_then(|v| i64::try_from(v).ok()))
                    .flatten()
                    .map(|n| usize::try_from(n).unwrap_or(0))
            };
            Some(match b.op {
                ast::BinOpKind::Mul => match (count(&b.left, l), count(&b.right, r)) {
                    (_, Some(n)) if l.1 => (l.0.saturating_mul(n), true),
                    (Some(n), _) if r.1 => (r.0.saturating_mul(n), true),
                    _ => (l.0.saturating_add(r.0), l.1 || r.1),
                },
                ast::BinOpKind::Concat | ast::BinOpKind::Add => {
                    (l.0.saturating_add(r.0), l.1 || r.1)
                }
                _ => (SMALL, false),
            })
        }
        E::Compare(c) => {
            const_size(&c.expr)?;
            for op in &c.ops {
                const_size(&op.expr)?;
            }
            Some((SMALL, false))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::MAX_TAG_TOKENS;
    use crate::data::template::{ChatTemplate, Message};

    /// Compiles and renders `src` on a thread with a 2 MiB stack (Rust's default for spawned
    /// threads, rayon's workers included): the check must hold there, not only on an 8 MiB main.
    fn on_2_mib(src: String) -> Result<String, String> {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let t = ChatTemplate::new(&src, "<s>", "</s>").map_err(|e| e.to_string())?;
                let m = [Message {
                    role: "user".into(),
                    content: "hi".into(),
                }];
                t.render(&m, true).map_err(|e| e.to_string())
            })
            .unwrap()
            .join()
            .expect("no panic")
    }

    fn rep(s: &str, n: usize) -> String {
        s.repeat(n)
    }

    #[test]
    fn operator_chains_are_refused_before_minijinja_recurses() {
        // Each of these (100,000 operators) overflowed the stack inside minijinja 2.24's parser
        // or compiler: SIGSEGV, no error.
        let n = 100_000;
        for src in [
            format!("{{{{ {}1 }}}}", rep("-", n)),
            format!("{{{{ {}1 }}}}", rep("not ", n)),
            format!("{{{{ 'a'{} }}}}", rep(" ~ 'a'", n)),
            format!("{{{{ 1{} }}}}", rep(" + 1", n)),
            format!("{{{{ 1{} }}}}", rep("|abs", n)),
            format!("{{{{ x{} }}}}", rep(".a", n)),
            format!("{{{{ x{} }}}}", rep("[0]", n)),
            format!("{{{{ x{} }}}}", rep("()", n)),
            format!("{{{{ 1{} }}}}", rep(" is defined", n)),
            format!("{{% if 1{} %}}{{% endif %}}", rep(" and 1", n)),
        ] {
            let e = on_2_mib(src).unwrap_err();
            assert!(e.contains("line 1") && e.contains("tokens"), "{e}");
        }
    }

    #[test]
    fn the_worst_allowed_tag_fits_in_2_mib() {
        // At the limit: the deepest recursion per token (unary minus), inside minijinja's own
        // limit of nested brackets and nested blocks.
        let k = MAX_TAG_TOKENS - 4;
        let if_nest = 140;
        for src in [
            format!("{{{{ {}1 }}}}", rep("-", k)),
            format!("{{{{ {}1 }}}}", rep("not ", k)),
            format!(
                "{{{{ {}{}1{} }}}}",
                rep("(", 140),
                rep("-", k - 290),
                rep(")", 140)
            ),
            format!("{{{{ x{} }}}}", rep("()", k / 2)),
            format!(
                "{}{{{{ {}1 }}}}{}",
                rep("{% if 1 %}", if_nest),
                rep("-", k),
                rep("{% endif %}", if_nest)
            ),
            format!(
                "{{% macro f() %}}{{{{ {}f() }}}}{{% endmacro %}}{{{{ f() }}}}",
                rep("-", k - 4)
            ),
        ] {
            // Ok or minijinja's own error; what matters is that the thread returns.
            let _ = on_2_mib(src);
        }
        // A tag of exactly the limit is accepted (`-`, `1`, then `+ 1` pairs), one more token
        // is refused.
        let n = (MAX_TAG_TOKENS - 2) / 2;
        let ok = on_2_mib(format!("{{{{ -1{} }}}}", rep(" + 1", n)));
        assert_eq!(ok.unwrap(), format!("{}", n as i64 - 1));
        let e = on_2_mib(format!("{{{{ --1{} }}}}", rep(" + 1", n))).unwrap_err();
        assert!(e.contains("more than 500 tokens"), "{e}");
    }

    #[test]
    fn a_namespace_cannot_be_stored_anywhere() {
        // The first overflowed the stack when printed (the cycle ns -> ns); the others are the
        // other ways to build a cycle or to reach a namespace without naming it.
        for (src, what) in [
            (
                "{% set ns = namespace(a=1) %}{% set ns.a = ns %}{{ ns }}",
                "`ns` is used",
            ),
            (
                "{% set ns = namespace() %}{% set ns.a = [ns] %}",
                "`ns` is used",
            ),
            (
                "{% set ns = namespace() %}{% set ns.a = {'k': ns} %}",
                "`ns` is used",
            ),
            (
                "{% set a = namespace() %}{% set b = namespace(x=a) %}",
                "`a` is used",
            ),
            ("{% set ns = namespace() %}{% set x = ns %}", "`ns` is used"),
            ("{% set ns = namespace() %}{{ ns|tojson }}", "`ns` is used"),
            (
                "{% set ns = namespace() %}{% macro m(x) %}{% endmacro %}{{ m(ns) }}",
                "`ns`",
            ),
            (
                "{% with ns = namespace() %}{% set ns.a = ns %}{% endwith %}",
                "`ns`",
            ),
            (
                "{% set ns = namespace() %}{% set ns.a = namespace() %}",
                "must be assigned",
            ),
            (
                "{% set f = namespace %}{% set n = f() %}",
                "`namespace` used as a value",
            ),
            ("{% import 'chat' as m %}", "{% import %}"),
            ("{% from 'chat' import ns %}", "import %}"),
        ] {
            let e = on_2_mib(src.into()).unwrap_err();
            assert!(e.contains("line 1") && e.contains(what), "{src}: {e}");
        }
        // How chat templates use namespaces (Qwen, Llama 3, Mistral, DeepSeek) still works.
        let ok = "{%- set ns = namespace(found=false, last=messages|length - 1, seen=[]) %}\
                  {%- for m in messages %}{% set ns.seen = ns.seen + [m.role] %}\
                  {%- if m.role == 'user' %}{% set ns.found = true %}{% endif %}{% endfor %}\
                  {{- ns.found }} {{ ns['last'] }} {{ ns.seen|join(',') }} {{ ns.items()|length }}";
        assert_eq!(on_2_mib(ok.into()).unwrap(), "True 0 user 3");
    }
}
