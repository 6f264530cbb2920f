//! Bounds the memory a chat template (code from a model file) may build while it renders.
//!
//! minijinja's fuel bounds instructions, but one instruction can double a value
//! (`{% set ns.s = ns.s ~ ns.s %}` 40 times is 2^40 bytes in ~200 instructions), and minijinja
//! 2.24 limits only `'x' * n`. So every operation that builds a value is checked *before* it
//! allocates, against two limits: no value over [`MAX_VALUE`] bytes, and no more than
//! [`MAX_BUILT`] bytes built by one rendering in all (every byte a template holds was built by
//! one of these operations, or is the conversation itself, so this bounds what it can hold).
//!
//! How each operation is reached:
//! - `~`, `+`, `*` and slicing are instructions of minijinja's VM (`StringConcat`, `Add`, `Mul`,
//!   `Slice`): [`rewrite`] replaces each with a call of a checked function of the same stack
//!   effect (`CallFunction(name, 2 or 4 args)`), which checks the sizes and then runs the same
//!   operation through minijinja itself (a one-operator expression), so results and errors are
//!   minijinja's. `EmitRaw` (template text) becomes `LoadConst` + `Emit` so that text written
//!   inside a capture (`{% set x %}…`, a macro's body) is counted like any other output.
//! - everything printed (`{{ … }}`, into the output or a capture) goes through the formatter;
//! - every built-in filter, the Python string/dict methods (minijinja-contrib's `pycompat`) and
//!   the functions that build values (`range`, `dict`) are replaced by wrappers that estimate the
//!   result from the arguments (`replace`, `indent`, `format`, `join`, `tojson` and the like take
//!   sizes from the template) and charge what they built; `debug()` is refused.
//!
//! - a constant expression (`'ab' * 49000000`, `c ~ c`) is computed by minijinja's compiler before
//!   any of this runs: `template_check` refuses one whose value would be over [`MAX_VALUE`].
//!
//! What is not counted: values of constant size (numbers, loop objects, a list literal's slots),
//! which fuel bounds (a few hundred bytes per instruction at most).
//!
//! Nesting is bounded too: minijinja drops, prints and compares a list or map recursively, so
//! `{% set ns.l = [ns.l] %}` in a loop (a few hundred KB, 100,000 levels) overflowed the stack
//! when the value was dropped. Every list or map literal (`BuildList`, `BuildMap`: [`rewrite`]
//! follows each with a call of [`check_nesting`]) and every result of a filter, method or
//! `dict()` is measured, and one nested deeper than [`MAX_NESTING`] is refused. The measure is
//! cheap: the depth of each list and map already measured in this rendering is remembered by
//! address (with a `Weak` that keeps the address from being reused), so a new list costs a
//! look-up per item, not a walk of everything under it.
use minijinja::machinery::{CodeGenerator, Instruction, Instructions};
use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Expression, State};
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Weak};

/// Largest value (string bytes, or an estimate of a container's printed size) one operation may
/// build: 16 MiB, the output cap (a training example is kilobytes).
pub const MAX_VALUE: usize = 16 << 20;

/// Most bytes one rendering may build in all (each `~` copies its operands, so a template that
/// prints a conversation of N bytes builds a small multiple of N; 16x the output cap).
pub const MAX_BUILT: usize = 256 << 20;

/// Bytes charged per item of a list or map that an operation builds (a `Value` and its slot).
const ITEM: usize = 32;

/// Deepest nesting of lists and maps that a template may build, print or serialise (minijinja
/// recurses per level when it drops, prints or compares one); real templates nest tools' JSON
/// schemas a few levels.
pub const MAX_NESTING: usize = 100;

thread_local! {
    /// Bytes this thread's rendering may still build.
    static LEFT: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Why the last check failed (the rendering's error is mapped to a named one from it).
    static HIT: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Nesting depth of the lists and maps this rendering has measured, by address.
    static DEPTHS: RefCell<Depths> = RefCell::new(Depths::default());
}

/// Starts a rendering's budget on this thread; [`Budget::hit`] says which limit stopped it.
pub(crate) struct Budget(());

impl Budget {
    pub(crate) fn start() -> Budget {
        LEFT.with(|l| l.set(MAX_BUILT));
        HIT.with(|h| h.borrow_mut().take());
        forget_depths();
        Budget(())
    }

    /// The limit that stopped the rendering, if one did.
    pub(crate) fn hit(&self) -> Option<String> {
        HIT.with(|h| h.borrow().clone())
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        LEFT.with(|l| l.set(usize::MAX));
        forget_depths();
    }
}

/// Depths by the address of a list's or map's shared allocation. The `Weak` keeps the address
/// from being reused while the entry exists (it holds the allocation, not the items); an entry
/// whose value is gone (strong count 0) is stale. Stale entries are dropped whenever the map has
/// doubled, so it holds about what the template holds.
#[derive(Default)]
struct Depths {
    by_addr: HashMap<usize, (Weak<dyn Any>, usize)>,
    prune_at: usize,
}

/// Empties [`DEPTHS`].
fn forget_depths() {
    let old = DEPTHS.with(|d| std::mem::take(&mut *d.borrow_mut()));
    drop(old);
}

fn remembered(addr: usize) -> Option<usize> {
    DEPTHS.with(|d| {
        let d = d.borrow();
        let (seen, depth) = d.by_addr.get(&addr)?;
        (seen.strong_count() > 0).then_some(*depth)
    })
}

fn remember(addr: usize, seen: Weak<dyn Any>, depth: usize) {
    DEPTHS.with(|d| {
        let d = &mut *d.borrow_mut();
        if d.by_addr.len() >= d.prune_at.max(4096) {
            d.by_addr.retain(|_, (seen, _)| seen.strong_count() > 0);
            d.prune_at = 2 * d.by_addr.len();
        }
        d.by_addr.insert(addr, (seen, depth));
    });
}

/// Nesting depth of `v` (0 for a scalar, 1 for a flat list or map) if it is at most `room`, else
/// `None`. Recursion is at most `room` + 1 calls deep; a list or map measured before is looked up.
fn nesting(v: &Value, room: usize) -> Option<usize> {
    let kind = v.kind();
    if !matches!(kind, ValueKind::Seq | ValueKind::Map | ValueKind::Iterable) {
        return Some(0);
    }
    // minijinja's lists are `Vec<Value>` and its maps `BTreeMap<Value, Value>` (2.24 without
    // `preserve_order`); other containers (lazy lists, objects) are walked each time.
    let list = v.downcast_object::<Vec<Value>>();
    let map = v.downcast_object::<BTreeMap<Value, Value>>();
    let addr = list
        .as_ref()
        .map(|l| Arc::as_ptr(l) as usize)
        .or(map.as_ref().map(|m| Arc::as_ptr(m) as usize));
    if let Some(d) = addr.and_then(remembered) {
        return (d <= room).then_some(d);
    }
    let below = room.checked_sub(1)?;
    let mut deepest = 0;
    if let Some(list) = &list {
        for item in list.iter() {
            deepest = deepest.max(nesting(item, below)?);
        }
    } else if let Some(map) = &map {
        for (k, item) in map.iter() {
            deepest = deepest.max(nesting(k, below)?).max(nesting(item, below)?);
        }
    } else if let Ok(items) = v.try_iter() {
        for item in items {
            if kind == ValueKind::Map {
                deepest = deepest.max(nesting(&v.get_item(&item).unwrap_or_default(), below)?);
            }
            deepest = deepest.max(nesting(&item, below)?);
        }
    }
    let seen: Option<Weak<dyn Any>> = match (&list, &map) {
        (Some(l), _) => Some(Arc::downgrade(l) as Weak<dyn Any>),
        (_, Some(m)) => Some(Arc::downgrade(m) as Weak<dyn Any>),
        _ => None,
    };
    if let (Some(a), Some(seen)) = (addr, seen) {
        remember(a, seen, deepest + 1);
    }
    Some(deepest + 1)
}

/// Refuses a value `op` built that nests lists or maps deeper than [`MAX_NESTING`].
fn check_nesting(op: &str, v: &Value) -> Result<(), Error> {
    match nesting(v, MAX_NESTING) {
        Some(_) => Ok(()),
        None => Err(refuse(format!(
            "{op} would nest lists or maps over {MAX_NESTING} levels deep"
        ))),
    }
}

fn refuse(what: String) -> Error {
    HIT.with(|h| *h.borrow_mut() = Some(what.clone()));
    Error::new(ErrorKind::InvalidOperation, what)
}

/// Refuses an operation that would build `bytes` (estimated before it allocates), then charges it.
fn charge(op: &str, bytes: usize) -> Result<(), Error> {
    if bytes > MAX_VALUE {
        return Err(refuse(format!(
            "{op} would build a value of over {} MiB",
            MAX_VALUE >> 20
        )));
    }
    LEFT.with(|l| match l.get().checked_sub(bytes) {
        Some(left) => {
            l.set(left);
            Ok(())
        }
        None => Err(refuse(format!(
            "{op}: the template has built over {} MiB in this rendering",
            MAX_BUILT >> 20
        ))),
    })
}

/// Bytes `v` takes when printed, serialised or joined (an over-estimate for containers: each item
/// counts 2 bytes plus 4 per nesting level, as pretty-printing indents). Stops counting past
/// `MAX_VALUE` (so a 2^30-item lazy list costs nothing to measure); `usize::MAX` when nested
/// deeper than [`MAX_NESTING`]. Iterative: a deep value cannot overflow the stack here.
pub(crate) fn printed_len(v: &Value) -> usize {
    let mut total = 0usize;
    let mut stack = vec![(v.clone(), 0usize)];
    while let Some((v, depth)) = stack.pop() {
        if total > MAX_VALUE {
            break;
        }
        match v.kind() {
            ValueKind::String => total += v.as_str().map_or(0, str::len),
            ValueKind::Bytes => total += v.as_bytes().map_or(0, <[u8]>::len),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
                if depth >= MAX_NESTING {
                    return usize::MAX;
                }
                let is_map = v.kind() == ValueKind::Map;
                if v.len().is_some_and(|n| n.saturating_mul(2) > MAX_VALUE) {
                    return MAX_VALUE + 1;
                }
                let Ok(items) = v.try_iter() else {
                    total += ITEM;
                    continue;
                };
                total += 2;
                for item in items {
                    total = total.saturating_add(2 + 4 * depth);
                    if is_map {
                        let value = v.get_item(&item).unwrap_or_default();
                        stack.push((value, depth + 1));
                    }
                    stack.push((item, depth + 1));
                    if total > MAX_VALUE {
                        return total;
                    }
                }
            }
            _ => total += ITEM,
        }
    }
    total
}

/// Bytes an operation's result occupies beyond what it shares with its inputs: a string's bytes,
/// a list's or map's slots (the items themselves are shared, and were charged when built).
fn own_len(v: &Value) -> usize {
    match v.kind() {
        ValueKind::String => v.as_str().map_or(0, str::len),
        ValueKind::Bytes => v.as_bytes().map_or(0, <[u8]>::len),
        ValueKind::Seq | ValueKind::Map => ITEM.saturating_mul(1 + v.len().unwrap_or(1)),
        _ => ITEM,
    }
}

fn str_len(v: Option<&Value>) -> usize {
    v.map_or(0, printed_len)
}

fn as_count(v: Option<&Value>) -> usize {
    match v {
        Some(v) => match v.as_str() {
            Some(s) => s.len(),
            None => i128::try_from(v.clone())
                .ok()
                .map_or(0, |n| usize::try_from(n.max(0)).unwrap_or(usize::MAX)),
        },
        None => 0,
    }
}

/// Occurrences of `pat` in `s` (an empty pattern matches between every character).
fn occurrences(s: &str, pat: &str) -> usize {
    if pat.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(pat).count()
    }
}

/// A bound on what a `%`- or `{}`-format string produces: its text, every number in it (widths
/// and precisions) and each placeholder filled with the largest argument.
fn format_len(fmt: &str, args: &[Value]) -> usize {
    let numbers: usize = fmt
        .split(|c: char| !c.is_ascii_digit())
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>().unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add);
    let slots = fmt.matches(['%', '{']).count() + 1;
    let widest = args.iter().map(printed_len).max().unwrap_or(0);
    fmt.len()
        .saturating_add(numbers)
        .saturating_add(slots.saturating_mul(widest))
}

/// The estimate for filter `name` applied to `args[0]` with the rest of `args`, before it runs.
fn filter_estimate(name: &str, args: &[Value]) -> usize {
    // Keyword arguments arrive as a map after the positional ones.
    let kwargs = args.last().filter(|k| k.is_kwargs());
    let pos = &args[..args.len() - usize::from(kwargs.is_some())];
    let input = str_len(pos.first());
    let (a1, a2) = (pos.get(1), pos.get(2));
    let kw = |key: &str| {
        kwargs
            .and_then(|k| k.get_attr(key).ok())
            .filter(|v| !v.is_undefined())
    };
    let args = pos;
    match name {
        // HTML escaping writes at most 6 bytes (`&#x27;`) per byte.
        "escape" | "e" => input.saturating_mul(6),
        "replace" => {
            let s = args.first().and_then(Value::as_str).unwrap_or("");
            let from = a1.and_then(Value::as_str).unwrap_or("");
            let n = occurrences(s, from);
            input.saturating_add(n.saturating_mul(str_len(a2)))
        }
        "indent" => {
            let lines = args
                .first()
                .and_then(Value::as_str)
                .map_or(1, |s| s.lines().count() + 1);
            let width = as_count(a1.or(kw("width").as_ref()));
            input.saturating_add(lines.saturating_mul(width))
        }
        "join" => {
            let n = args.first().and_then(Value::len).unwrap_or(1);
            input.saturating_add(n.saturating_mul(str_len(a1)))
        }
        "format" => {
            let fmt = args.first().and_then(Value::as_str).unwrap_or("");
            format_len(fmt, &args[1.min(args.len())..])
        }
        "tojson" => {
            // \uXXXX escapes, and the indent on every line.
            let indent = as_count(a1.or(kw("indent").as_ref())).max(1);
            input
                .saturating_mul(6)
                .saturating_mul(indent.saturating_add(1))
        }
        // `{:#?}`: 4 spaces per level (counted by printed_len) plus quotes and escapes.
        "pprint" | "urlencode" => input.saturating_mul(3),
        "split" | "lines" => {
            let s = args.first().and_then(Value::as_str).unwrap_or("");
            let parts = match (name, a1.and_then(Value::as_str)) {
                ("split", Some(sep)) => occurrences(s, sep),
                ("split", None) => s.split_whitespace().count(),
                _ => s.lines().count(),
            };
            input.saturating_add(parts.saturating_add(1).saturating_mul(ITEM))
        }
        "batch" | "slice" => {
            let n = args.first().and_then(Value::len).unwrap_or(0);
            n.saturating_add(as_count(a1))
                .saturating_mul(ITEM)
                .saturating_add(input)
        }
        "list" | "sort" | "reverse" | "unique" | "dictsort" | "items" | "chain" | "zip" | "map"
        | "select" | "reject" | "selectattr" | "rejectattr" | "groupby" => {
            // New slots for every item (lazy inputs are measured by printed_len).
            let items: usize = args
                .iter()
                .map(|a| a.len().unwrap_or(0))
                .fold(0, usize::saturating_add);
            items.saturating_mul(ITEM).max(input.min(MAX_VALUE + 1))
        }
        _ => input,
    }
}

/// The built-in filters that a wrapper replaces (every filter of minijinja 2.24's `builtins` and
/// `json` features; `urlencode` is not compiled in).
fn builtin_filters() -> Vec<(&'static str, Value)> {
    use minijinja::filters as f;
    vec![
        ("safe", Value::from_function(f::safe)),
        ("escape", Value::from_function(f::escape)),
        ("e", Value::from_function(f::escape)),
        ("lower", Value::from_function(f::lower)),
        ("upper", Value::from_function(f::upper)),
        ("title", Value::from_function(f::title)),
        ("capitalize", Value::from_function(f::capitalize)),
        ("replace", Value::from_function(f::replace)),
        ("length", Value::from_function(f::length)),
        ("count", Value::from_function(f::length)),
        ("dictsort", Value::from_function(f::dictsort)),
        ("items", Value::from_function(f::items)),
        ("reverse", Value::from_function(f::reverse)),
        ("trim", Value::from_function(f::trim)),
        ("join", Value::from_function(f::join)),
        ("split", Value::from_function(f::split)),
        ("lines", Value::from_function(f::lines)),
        ("default", Value::from_function(f::default)),
        ("d", Value::from_function(f::default)),
        ("round", Value::from_function(f::round)),
        ("abs", Value::from_function(f::abs)),
        ("int", Value::from_function(f::int)),
        ("float", Value::from_function(f::float)),
        ("attr", Value::from_function(f::attr)),
        ("first", Value::from_function(f::first)),
        ("last", Value::from_function(f::last)),
        ("min", Value::from_function(f::min)),
        ("max", Value::from_function(f::max)),
        ("sort", Value::from_function(f::sort)),
        ("list", Value::from_function(f::list)),
        ("string", Value::from_function(f::string)),
        ("bool", Value::from_function(f::bool)),
        ("batch", Value::from_function(f::batch)),
        ("slice", Value::from_function(f::slice)),
        ("sum", Value::from_function(f::sum)),
        ("indent", Value::from_function(f::indent)),
        ("select", Value::from_function(f::select)),
        ("reject", Value::from_function(f::reject)),
        ("selectattr", Value::from_function(f::selectattr)),
        ("rejectattr", Value::from_function(f::rejectattr)),
        ("map", Value::from_function(f::map)),
        ("groupby", Value::from_function(f::groupby)),
        ("unique", Value::from_function(f::unique)),
        ("chain", Value::from_function(f::chain)),
        ("zip", Value::from_function(f::zip)),
        ("pprint", Value::from_function(f::pprint)),
        ("format", Value::from_function(f::format)),
        ("tojson", Value::from_function(f::tojson)),
    ]
}

/// The estimate for Python method `name` called on `value` (minijinja-contrib's pycompat).
fn method_estimate(value: &Value, name: &str, args: &[Value]) -> usize {
    let input = printed_len(value);
    let s = value.as_str().unwrap_or("");
    match name {
        "replace" => {
            let mut n = occurrences(s, args.first().and_then(Value::as_str).unwrap_or(""));
            if let Some(count) = args.get(2).filter(|c| c.as_i64().is_some_and(|c| c >= 0)) {
                n = n.min(as_count(Some(count)));
            }
            input.saturating_add(n.saturating_mul(str_len(args.get(1))))
        }
        "format" => format_len(s, args),
        "join" => {
            let items = args.first();
            let n = items.and_then(Value::len).unwrap_or(1);
            str_len(items).saturating_add(n.saturating_mul(input))
        }
        "split" | "splitlines" => {
            let parts = match args.first().and_then(Value::as_str) {
                Some(sep) if name == "split" => occurrences(s, sep),
                _ => s.split_whitespace().count() + s.lines().count(),
            };
            input.saturating_add(parts.saturating_add(1).saturating_mul(ITEM))
        }
        "items" | "keys" | "values" => value.len().unwrap_or(1).saturating_mul(3 * ITEM),
        _ => input.saturating_add(args.iter().map(printed_len).fold(0, usize::saturating_add)),
    }
}

/// minijinja's own `+`, `*` and slicing, run on two (four) values: the checked functions call
/// these after their size check, so results and error messages are minijinja's.
struct Ops {
    add: Expression<'static, 'static>,
    mul: Expression<'static, 'static>,
    slice: Expression<'static, 'static>,
}

static OPS: LazyLock<Ops> = LazyLock::new(|| {
    let env: &'static Environment<'static> = Box::leak(Box::new(Environment::new()));
    let compile = |e: &'static str| {
        env.compile_expression(e)
            .expect("a one-operator expression")
    };
    Ops {
        add: compile("a + b"),
        mul: compile("a * b"),
        slice: compile("a[b:c:d]"),
    }
});

/// Runs `e` on `a`..`d`; an error keeps its kind and text but not the helper's line.
fn run(e: &Expression, a: &Value, b: &Value, c: &Value, d: &Value) -> Result<Value, Error> {
    e.eval(minijinja::context! { a => a, b => b, c => c, d => d })
        .map_err(|err| Error::new(err.kind(), err.detail().unwrap_or("").to_string()))
}

fn is_seq(v: &Value) -> bool {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// `a ~ b` (minijinja's `string_concat` is `format!("{a}{b}")`).
fn concat(a: &Value, b: &Value) -> Result<Value, Error> {
    charge("`~`", printed_len(a).saturating_add(printed_len(b)))?;
    Ok(Value::from(format!("{a}{b}")))
}

/// `a + b`: strings are copied; lists are joined lazily (minijinja copies them into one list
/// every 32 joins, so each join is charged its share of that copy).
fn add(a: &Value, b: &Value) -> Result<Value, Error> {
    let (x, y) = (a.len().unwrap_or(0), b.len().unwrap_or(0));
    if a.as_str().is_some() && b.as_str().is_some() {
        charge("`+`", x.saturating_add(y))?;
    } else if is_seq(a) && is_seq(b) {
        let n = x.saturating_add(y);
        if n.saturating_mul(ITEM) > MAX_VALUE {
            return Err(refuse(format!("`+` would build a list of {n} items")));
        }
        charge("`+`", ITEM.saturating_add(n))?;
    }
    run(&OPS.add, a, b, &Value::UNDEFINED, &Value::UNDEFINED)
}

/// `a * b`: a string or a list repeated.
fn mul(a: &Value, b: &Value) -> Result<Value, Error> {
    let (item, n) = if a.as_str().is_some() || is_seq(a) {
        (a, b)
    } else {
        (b, a)
    };
    if item.as_str().is_some() || is_seq(item) {
        let per = if is_seq(item) { ITEM } else { 1 };
        let len = item.len().unwrap_or(0).saturating_mul(per);
        charge("`*`", len.saturating_mul(as_count(Some(n))))?;
    }
    run(&OPS.mul, a, b, &Value::UNDEFINED, &Value::UNDEFINED)
}

/// `a[b:c:d]` (a copy of at most `a`).
fn slice(a: &Value, b: &Value, c: &Value, d: &Value) -> Result<Value, Error> {
    let rv = run(&OPS.slice, a, b, c, d)?;
    charge("slicing", own_len(&rv))?;
    Ok(rv)
}

/// Names of the checked functions the rewritten instructions call (a template cannot define a
/// name with this prefix: `ChatTemplate::new` refuses it).
pub(crate) const PREFIX: &str = "__qtune_";

/// Installs the checked functions, filters, methods and formatter into `env`.
pub(crate) fn install(env: &mut Environment<'static>) {
    env.add_function("__qtune_concat", |a: Value, b: Value| concat(&a, &b));
    env.add_function("__qtune_add", |a: Value, b: Value| add(&a, &b));
    env.add_function("__qtune_mul", |a: Value, b: Value| mul(&a, &b));
    env.add_function("__qtune_slice", |a: Value, b: Value, c: Value, d: Value| {
        slice(&a, &b, &c, &d)
    });
    for (name, f) in builtin_filters() {
        env.add_filter(name, move |state: &State, args: Rest<Value>| {
            charge(&format!("|{name}"), filter_estimate(name, &args))?;
            let rv = f.call(state, &args)?;
            charge(&format!("|{name}"), own_len(&rv))?;
            check_nesting(&format!("|{name}"), &rv)?;
            Ok(rv)
        });
    }
    env.set_unknown_method_callback(|state, value, method, args| {
        charge(
            &format!(".{method}()"),
            method_estimate(value, method, args),
        )?;
        let rv = minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)?;
        charge(&format!(".{method}()"), own_len(&rv))?;
        check_nesting(&format!(".{method}()"), &rv)?;
        Ok(rv)
    });
    let range = Value::from_function(minijinja::functions::range);
    env.add_function("range", move |state: &State, args: Rest<Value>| {
        let rv = range.call(state, &args)?;
        charge("range()", own_len(&rv))?;
        Ok(rv)
    });
    let dict = Value::from_function(minijinja::functions::dict);
    env.add_function("dict", move |state: &State, args: Rest<Value>| {
        charge(
            "dict()",
            args.iter().map(own_len).fold(0, usize::saturating_add),
        )?;
        let rv = dict.call(state, &args)?;
        check_nesting("dict()", &rv)?;
        Ok(rv)
    });
    env.add_function("__qtune_nest", |v: Value| {
        check_nesting("a list or map literal", &v)?;
        Ok(v)
    });
    env.add_function("debug", || -> Result<Value, Error> {
        Err(Error::new(
            ErrorKind::InvalidOperation,
            "debug() is not available in chat templates",
        ))
    });
    env.set_formatter(|out, state, value| {
        charge("printing", printed_len(value))?;
        minijinja::escape_formatter(out, state, value)
    });
}

/// Compiles `source` (already parsed once by `ChatTemplate::new`) into instructions whose
/// value-building operations call the checked functions of [`install`].
pub(crate) fn compile(
    source: &str,
) -> Result<(Instructions<'_>, BTreeMap<&str, Instructions<'_>>), Error> {
    let ast = minijinja::machinery::parse(
        source,
        "chat",
        minijinja::syntax::SyntaxConfig,
        super::template_check::whitespace(),
    )?;
    let mut gen = CodeGenerator::new("chat", source);
    gen.compile_stmt(&ast);
    let (root, blocks) = gen.finish();
    let blocks = blocks
        .into_iter()
        .map(|(name, b)| (name, rewrite(&b, source)))
        .collect();
    Ok((rewrite(&root, source), blocks))
}

/// `instrs` with `StringConcat`/`Add`/`Mul`/`Slice` turned into calls of the checked functions,
/// `EmitRaw(text)` into `LoadConst(text)` + `Emit`, and `BuildList`/`BuildMap` followed by the
/// nesting check (a call that returns its argument); jump targets follow the moved
/// instructions, and every instruction keeps its line.
fn rewrite<'s>(instrs: &Instructions<'s>, source: &'s str) -> Instructions<'s> {
    // Old index -> new index (EmitRaw, BuildList and BuildMap take two slots).
    let two = |i: &Instruction| {
        matches!(
            i,
            Instruction::EmitRaw(_) | Instruction::BuildList(_) | Instruction::BuildMap(_)
        )
    };
    let mut at = Vec::new();
    let mut n = 0u32;
    while let Some(i) = instrs.get(at.len() as u32) {
        at.push(n);
        n += if two(i) { 2 } else { 1 };
    }
    at.push(n);
    let to = |t: &u32| at[*t as usize];
    let mut out = Instructions::new(instrs.name(), source);
    for (idx, _) in at.iter().enumerate().take(at.len() - 1) {
        let i = instrs.get(idx as u32).expect("in range");
        let line = instrs.get_line(idx as u32).unwrap_or(0) as u16;
        let new = match i {
            Instruction::StringConcat => Instruction::CallFunction("__qtune_concat", Some(2)),
            Instruction::Add => Instruction::CallFunction("__qtune_add", Some(2)),
            Instruction::Mul => Instruction::CallFunction("__qtune_mul", Some(2)),
            Instruction::Slice => Instruction::CallFunction("__qtune_slice", Some(4)),
            Instruction::EmitRaw(text) => {
                out.add_with_line(Instruction::LoadConst(Value::from(*text)), line);
                Instruction::Emit
            }
            Instruction::BuildList(_) | Instruction::BuildMap(_) => {
                out.add_with_line(i.clone(), line);
                Instruction::CallFunction("__qtune_nest", Some(1))
            }
            Instruction::Jump(t) => Instruction::Jump(to(t)),
            Instruction::JumpIfFalse(t) => Instruction::JumpIfFalse(to(t)),
            Instruction::JumpIfFalseOrPop(t) => Instruction::JumpIfFalseOrPop(to(t)),
            Instruction::JumpIfTrueOrPop(t) => Instruction::JumpIfTrueOrPop(to(t)),
            Instruction::Iterate(t) => Instruction::Iterate(to(t)),
            Instruction::BuildMacro(name, t, flags) => Instruction::BuildMacro(name, to(t), *flags),
            // Every other instruction, named so that a minijinja with a new one (perhaps one
            // that jumps) fails to build here instead of running with a wrong target.
            i @ (Instruction::StoreLocal(_)
            | Instruction::Lookup(_)
            | Instruction::GetAttr(_)
            | Instruction::SetAttr(_)
            | Instruction::GetItem
            | Instruction::LoadConst(_)
            | Instruction::BuildKwargs(_)
            | Instruction::MergeKwargs(_)
            | Instruction::UnpackList(_)
            | Instruction::UnpackLists(_)
            | Instruction::Sub
            | Instruction::Div
            | Instruction::IntDiv
            | Instruction::Rem
            | Instruction::Pow
            | Instruction::Neg
            | Instruction::Eq
            | Instruction::Ne
            | Instruction::Gt
            | Instruction::Gte
            | Instruction::Lt
            | Instruction::Lte
            | Instruction::Not
            | Instruction::In
            | Instruction::CompareAndPreserve(_)
            | Instruction::ApplyFilter(..)
            | Instruction::PerformTest(..)
            | Instruction::Emit
            | Instruction::PushLoop(_)
            | Instruction::PushWith
            | Instruction::PushDidNotIterate
            | Instruction::PopFrame
            | Instruction::PopLoopFrame
            | Instruction::PushAutoEscape
            | Instruction::PopAutoEscape
            | Instruction::BeginCapture(_)
            | Instruction::EndCapture
            | Instruction::CallFunction(..)
            | Instruction::CallMethod(..)
            | Instruction::CallObject(_)
            | Instruction::DupTop
            | Instruction::DiscardTop
            | Instruction::FastSuper
            | Instruction::FastRecurse
            | Instruction::Swap
            | Instruction::CallBlock(_)
            | Instruction::LoadBlocks
            | Instruction::Include(_)
            | Instruction::ExportLocals
            | Instruction::Return
            | Instruction::IsUndefined
            | Instruction::Enclose(_)
            | Instruction::GetClosure) => i.clone(),
        };
        out.add_with_line(new, line);
    }
    out
}
