//! Chat templates: the Jinja `chat_template` a model ships (rendered by minijinja with Python's
//! string methods, as transformers renders it with jinja2) or a named built-in one.
use super::guard;
use super::template_limits as limits;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// "system", "user", "assistant" (or whatever the template knows).
    pub role: String,
    /// The turn's text.
    pub content: String,
}

/// ChatML (`<|im_start|>role\n...<|im_end|>\n`), as Qwen and many fine-tunes use.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Built-in templates by name.
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[("chatml", CHATML)];

/// Instructions one rendering may run (minijinja's fuel). A template is code from a model file:
/// real chat templates take a few hundred instructions per turn, so this allows conversations of
/// thousands of turns and stops a template that loops for ever within a fraction of a second.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// Most bytes one rendering may write (a training example is kilobytes; a template that prints
/// without end stops here instead of filling memory).
pub const TEMPLATE_MAX_OUTPUT: usize = 16 << 20;

/// A checked chat template with the special-token strings it may refer to. Each rendering
/// compiles it into minijinja instructions whose value-building operations are size-checked
/// (`template_limits`): a template from a model file can neither loop for ever (fuel) nor build
/// values without bound.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
    origin: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source` (Jinja text); `bos_token`/`eos_token` are the strings the template sees.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        // Refuse what minijinja would crash on (a stack overflow is no error): see template_check.
        super::template_check::check(source).map_err(|e| {
            Error::Invalid(format!(
                "{e}; a chat template is code from the model's files: use --chat-template \
                 chatml or a template file you trust"
            ))
        })?;
        if source.contains(limits::PREFIX) {
            return Err(Error::Invalid(format!(
                "chat template: names starting with `{}` are reserved for qtune's checks",
                limits::PREFIX
            )));
        }
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with these two jinja2 options.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        // minijinja turns debug info on in debug builds; its rendering of a span can subtract
        // with overflow (a fuzzed template, fuzz/regressions/chat_template/debug-info-span-*)
        // and it dumps the template and the variables (the conversation) into the error. The
        // error keeps its line either way: off in every build.
        env.set_debug(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers' templates call raise_exception(msg) on conversations they refuse.
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        limits::install(&mut env);
        // Compiled here for its errors (minijinja's messages, with the line); each rendering
        // compiles the checked instructions again (the template's text outlives no borrow).
        limits::compile(source)
            .map_err(|e| Error::Invalid(format!("chat template does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: "the chat template".to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Names where the template came from in its errors ("the chat template of
    /// …/tokenizer_config.json", "chat template file t.jinja").
    pub fn with_origin(mut self, origin: impl Into<String>) -> ChatTemplate {
        self.origin = origin.into();
        self
    }

    /// The built-in template called `name`, if there is one.
    pub fn builtin(name: &str) -> Option<&'static str> {
        BUILTIN_TEMPLATES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }

    /// Renders `messages`; `add_generation_prompt` appends the opening of an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let (instrs, blocks) = limits::compile(&self.source)
            .map_err(|e| Error::Invalid(format!("chat template: {e}")))?;
        let root = minijinja::Value::from_serialize(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        });
        let mut out = String::new();
        let budget = limits::Budget::start();
        // minijinja can panic on a template (2.24: `'%9{\u{fffd}…}'.format(x)` slices a format
        // spec inside a character, format_utils.rs:811): the panic becomes a named error.
        let rv = guard::catch(|| {
            minijinja::machinery::Vm::new(&self.env).eval(
                &instrs,
                root,
                &blocks,
                &mut minijinja::machinery::make_string_output(&mut out),
                minijinja::AutoEscape::None,
            )
        });
        let origin = &self.origin;
        let rv = match rv {
            Ok(rv) => rv,
            Err(panic) => {
                return Err(Error::Invalid(format!(
                    "{origin} failed to render (minijinja panicked: {panic}); use \
                     --chat-template chatml or a template file you trust"
                )))
            }
        };
        match rv {
            Err(e) => Err(if let Some(why) = budget.hit() {
                let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
                Error::Invalid(format!(
                    "{origin}: {why}{line}; a chat template is code from the model's files and \
                     this one builds values without bound (its memory or stack would run out): use \
                     --chat-template chatml or a template file you trust"
                ))
            } else if e.kind() == minijinja::ErrorKind::OutOfFuel {
                Error::Invalid(format!(
                    "{origin} ran over {TEMPLATE_FUEL} instructions; the template does not end \
                     (or the conversation is far too long)"
                ))
            } else {
                Error::Invalid(format!("{origin} failed to render: {e:#}"))
            }),
            Ok(_) if out.len() > TEMPLATE_MAX_OUTPUT => Err(Error::Invalid(format!(
                "{origin}: output exceeds {} MiB; the template does not end",
                TEMPLATE_MAX_OUTPUT >> 20
            ))),
            Ok(_) => Ok(out),
        }
    }

    /// The conversation as text segments with whether each carries loss: each assistant turn is
    /// the difference between the rendering up to and including it and the rendering before it
    /// with the generation prompt; everything else is prompt. Fails if the template is not
    /// prefix-stable (a later rendering rewrites an earlier one), since then no split is exact.
    pub fn segments(&self, messages: &[Message]) -> Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        let mut done = String::new();
        let mut take = |text: String, loss: bool, done: &mut String| -> Result<()> {
            let Some(delta) = text.strip_prefix(done.as_str()) else {
                return Err(Error::Invalid(
                    "the chat template re-renders earlier turns differently when a turn is \
                     added, so assistant tokens cannot be located; use a built-in template \
                     (e.g. chatml) or --train-on-prompt"
                        .into(),
                ));
            };
            if !delta.is_empty() {
                out.push((delta.to_string(), loss));
            }
            *done = text;
            Ok(())
        };
        for (i, m) in messages.iter().enumerate() {
            if m.role == "assistant" {
                take(self.render(&messages[..i], true)?, false, &mut done)?;
                take(self.render(&messages[..=i], false)?, true, &mut done)?;
            }
        }
        take(self.render(messages, false)?, false, &mut done)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_segments_split_at_assistant_turns() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let segs = t
            .segments(&[msg("user", "hi"), msg("assistant", "yo")])
            .unwrap();
        assert_eq!(
            segs,
            vec![
                (
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n".to_string(),
                    false
                ),
                ("yo<|im_end|>\n".to_string(), true),
            ]
        );
    }

    #[test]
    fn raise_exception_and_python_methods_work() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ messages[0]['content'].strip() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[msg("user", "  x ")], false).unwrap(), "x");
        let e = t.render(&[msg("system", "x")], false).unwrap_err();
        assert!(e.to_string().contains("user first"), "{e}");
    }

    fn conv() -> Vec<Message> {
        vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }]
    }

    #[test]
    fn a_template_that_does_not_end_is_stopped() {
        for (src, want) in [
            // Endless work: a loop far beyond the fuel.
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                "instructions",
            ),
            // Endless output: 10 MB per iteration, stopped by what one rendering may build (every
            // value printed counts) before the output cap.
            (
                "{% for i in range(1000) %}{{ 'x' * 10000000 }}{% endfor %}",
                "has built over 256 MiB",
            ),
            // Output over the cap within the build limit: 17 x 1 MB.
            (
                "{% for i in range(17) %}{{ 'x' * 1048576 }}{% endfor %}",
                "output exceeds",
            ),
        ] {
            let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
            let e = t.render(&conv(), true).unwrap_err().to_string();
            assert!(e.contains(want), "{src}: {e}");
        }
        // An ordinary template still renders.
        let t = ChatTemplate::new(super::CHATML, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&conv(), true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn nesting_is_bounded_where_values_are_built() {
        let render = |src: &str| ChatTemplate::new(src, "", "")?.render(&conv(), false);
        // 100 levels (the limit) build and print; the 101st is refused by name.
        let ok = "{% set ns = namespace(l=1) %}{% for i in range(100) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l|length }}";
        assert_eq!(render(ok).unwrap(), "1");
        let deep = ok.replace("100", "101");
        let e = render(&deep).unwrap_err().to_string();
        assert!(
            e.contains("a list or map literal would nest lists or maps over 100 levels deep")
                && e.contains("--chat-template chatml"),
            "{e}"
        );
        // Shared items are measured once: 99 levels of [l, l] are 2^99 paths (not printed: the
        // print estimate counts paths), and 2,000 new lists hold the same 1,000-item list.
        let dag = "{% set ns = namespace(l=1) %}{% for i in range(99) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}done";
        assert_eq!(render(dag).unwrap(), "done");
        let wide = "{% set ns = namespace(l=range(1000)|list, n=0) %}{% for i in range(2000) %}{% set ns.n = [ns.l, ns.l]|length %}{% endfor %}{{ ns.n }}";
        assert_eq!(render(wide).unwrap(), "2");
        // Filters, methods and dict() that wrap their input.
        for step in [
            "{'k': ns.l}",
            "dict(k=ns.l)",
            "ns.l|batch(1)|list",
            "[ns.l]|slice(1)|list",
            "{'k': ns.l}.items()|list",
            "{'k': ns.l}|items|list",
            "{'k': ns.l}|dictsort",
        ] {
            let src = format!("{{% set ns = namespace(l=[1]) %}}{{% for i in range(200) %}}{{% set ns.l = {step} %}}{{% endfor %}}{{{{ ns.l|length }}}}");
            let e = render(&src).unwrap_err().to_string();
            assert!(e.contains("over 100 levels deep"), "{step}: {e}");
        }
    }
}
