//! Lays the sidecar's binary out with the functions it runs first, in
//! order of how much they run (`hot-symbols.txt`, from callgrind; how to
//! regenerate it: BENCHMARKS.md, mutual TLS). The binary's resident pages
//! are most of the sidecar's memory, and the kernel maps 64 KB around
//! every page of code touched: with the code that runs packed together,
//! far fewer cold pages come along (about 3 MB less under mTLS load).
//!
//! Names carry a hash of their crate's build settings, so the list goes
//! stale when dependencies or features change: a name that no longer
//! exists is skipped (memory, never correctness, suffers), and the mTLS
//! benchmark reports how many of the names the binary still has.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let list = std::path::Path::new(&dir).join("hot-symbols.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-env-changed=MESHGATE_NO_SYMBOL_ORDERING");
    if std::env::var_os("MESHGATE_NO_SYMBOL_ORDERING").is_some() {
        return;
    }
    // The flags are rust-lld's, rustc's default linker on x86_64 Linux
    // from Rust 1.90; with an older rustc (GNU ld) the layout is left as
    // it is.
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-linux-gnu" && rustc_minor().is_some_and(|m| m >= 90) {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// The minor version of the rustc building this (`rustc 1.95.0 (...)`).
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = std::process::Command::new(rustc).arg("-V").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.split_whitespace().nth(1)?;
    version.split('.').nth(1)?.parse().ok()
}
