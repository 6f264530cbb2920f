//! A boundary around third-party code that can panic on untrusted input (the `tokenizers` crate
//! unwraps some of its own parse errors and slices by lengths it read from `tokenizer.json`): the
//! panic becomes a named error, and the default hook's "thread panicked at" message is not printed.
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Depth of `catch` calls on this thread (a panic inside one is caught by it).
    static INSIDE: Cell<usize> = const { Cell::new(0) };
    /// The message of the last panic caught on this thread, with where it happened.
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once per process) a hook that stays silent for panics inside [`catch`] on the
/// current thread and records their message; every other panic goes to the previous hook.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if INSIDE.with(Cell::get) > 0 {
                let what = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                let at = info
                    .location()
                    .map(|l| format!(" (at {}:{})", l.file(), l.line()))
                    .unwrap_or_default();
                MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{what}{at}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic inside it is returned as `Err(message)` (its text and source location), with
/// nothing printed. Use only around code whose state is dropped when it panics (the unwind safety
/// is asserted: callers discard everything `f` touched on error).
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    install_hook();
    INSIDE.with(|d| d.set(d.get() + 1));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    INSIDE.with(|d| d.set(d.get() - 1));
    r.map_err(|_| {
        MESSAGE
            .with(|m| m.borrow_mut().take())
            .unwrap_or_else(|| "panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::catch;

    #[test]
    fn a_panic_becomes_its_message() {
        let e = catch(|| -> u32 { panic!("slice index starts at 2 but ends at 1") }).unwrap_err();
        assert!(
            e.starts_with("slice index starts at 2 but ends at 1 (at "),
            "{e}"
        );
        assert!(e.contains("guard.rs"), "{e}");
        assert_eq!(catch(|| 7).unwrap(), 7);
    }

    #[test]
    fn nested_and_formatted_panics() {
        let e = catch(|| catch(|| -> u8 { panic!("inner {}", 1) }).unwrap_err()).unwrap();
        assert!(e.starts_with("inner 1"), "{e}");
        let e = catch(|| -> u8 { panic!("outer {}", 2) }).unwrap_err();
        assert!(e.starts_with("outer 2"), "{e}");
    }
}
