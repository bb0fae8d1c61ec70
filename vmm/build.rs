//! Builds the tiny guest kernel (guest/kernel) with a nested cargo call.
//!
//! The guest is its own workspace with its own `.cargo/config.toml`
//! (freestanding rustflags, linker script). Cargo reads that file relative to
//! its working directory, so the nested call runs *in* guest/kernel, with its
//! own target directory under OUT_DIR and with every rustflags variable of the
//! outer build removed: the VMM's flags must not reach the guest, nor the
//! guest's reach the VMM.
use std::path::{Path, PathBuf};
use std::process::Command;

fn rerun_if_changed_tree(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                rerun_if_changed_tree(&path);
            } else {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("vmm/ has a parent").to_path_buf();
    let guest_dir = root.join("guest/kernel");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("guest-target");

    for dir in ["guest/kernel/src", "guest/abi/src", "guest/mm/src", "guest/user/src"] {
        rerun_if_changed_tree(&root.join(dir));
    }
    for file in [
        "guest/kernel/Cargo.toml",
        "guest/kernel/Cargo.lock",
        "guest/kernel/build.rs",
        "guest/kernel/.cargo/config.toml",
        "guest/abi/Cargo.toml",
        "guest/mm/Cargo.toml",
        "guest/user/Cargo.toml",
        "resources/guest-kernel.ld",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--offline", "--target-dir"])
        .arg(&target_dir);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
    ] {
        cmd.env_remove(var);
    }
    // Profile overrides of the outer build (CARGO_PROFILE_*) must not apply.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PROFILE_") {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().expect("could not run cargo to build the guest kernel");
    assert!(status.success(), "building the guest kernel (guest/kernel) failed");

    let built = target_dir.join("x86_64-unknown-linux-gnu/release/memvisor-guest");
    let dest = out_dir.join("memvisor-guest.elf");
    std::fs::copy(&built, &dest).expect("could not copy the guest kernel into OUT_DIR");
    println!("cargo:rustc-env=MEMVISOR_GUEST_ELF={}", dest.display());
}
