//! The AFL++ persistent-mode loop our fuzz targets share. Each target is a binary whose `main`
//! calls [`run`] with one function over the input bytes; `bench/fuzz.sh` builds them with
//! rustc's coverage instrumentation (sancov trace-pc-guard, compare tracing) linked against
//! Debian's AFL++ runtime and runs `afl-fuzz` on each. A panic is a crash: the hook aborts so
//! AFL++ records it.

use std::io::Read;

// AFL++ looks for these markers in the binary to use persistent mode and the deferred fork
// server (the same ones afl-cc embeds).
#[used]
static PERSISTENT_SIG: &[u8] = b"##SIG_AFL_PERSISTENT##\0";
#[used]
static DEFERRED_SIG: &[u8] = b"##SIG_AFL_DEFER_FORKSRV##\0";

extern "C" {
    fn __afl_persistent_loop(count: u32) -> i32;
    fn __afl_manual_init();
}

/// Runs `target` on every input AFL++ hands over (many per process).
pub fn run(target: fn(&[u8])) {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}");
        std::process::abort();
    }));
    // SAFETY: the AFL++ runtime's entry points, called as afl-cc's generated code calls them.
    unsafe { __afl_manual_init() };
    let mut input = Vec::with_capacity(1 << 16);
    // SAFETY: as above; the loop returns 0 when AFL++ wants a fresh process.
    while unsafe { __afl_persistent_loop(100_000) } != 0 {
        input.clear();
        if std::io::stdin().read_to_end(&mut input).is_err() {
            return;
        }
        target(&input);
    }
}

/// Splits `first line \n rest`: targets that take a name and a payload (a verb and a command).
pub fn split_line(input: &[u8]) -> (&str, &[u8]) {
    let at = input.iter().position(|&b| b == b'\n').unwrap_or(input.len());
    let head = std::str::from_utf8(&input[..at]).unwrap_or("");
    (head, input.get(at + 1..).unwrap_or(&[]))
}
