//! Host paths that tests need. The guest sees the host's root filesystem at the same paths,
//! so every path returned here can also be used inside a guest script.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::HarnessError;

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The crate lives at <repo>/tests, so a parent always exists.
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The guest init script, `<repo>/qemu/guest-init.sh`.
pub fn guest_init() -> PathBuf {
    repo_root().join("qemu/guest-init.sh")
}

/// The built guest kernel tree: `$SANBLK_KERNEL_TREE` if set, else the last stdout line of
/// `qemu/build-kernel.sh` (instant when the kernel is cached; builds it otherwise, which
/// takes about 10 minutes). Resolved once per test process.
pub fn kernel_tree() -> Result<PathBuf, HarnessError> {
    static TREE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TREE.get_or_init(resolve_kernel_tree)
        .clone()
        .map_err(HarnessError::Kernel)
}

/// The guest kernel image, `<kernel tree>/arch/x86/boot/bzImage`.
pub fn kernel_image() -> Result<PathBuf, HarnessError> {
    let image = kernel_tree()?.join("arch/x86/boot/bzImage");
    if image.is_file() {
        Ok(image)
    } else {
        Err(HarnessError::Kernel(format!(
            "{} does not exist",
            image.display()
        )))
    }
}

fn resolve_kernel_tree() -> Result<PathBuf, String> {
    // Empty means unset: `make test` passes its (possibly empty) KDIR through.
    if let Some(tree) = std::env::var_os("SANBLK_KERNEL_TREE").filter(|t| !t.is_empty()) {
        return Ok(PathBuf::from(tree));
    }
    let script = repo_root().join("qemu/build-kernel.sh");
    let output = Command::new(&script)
        .stdin(Stdio::null())
        // Build progress (stderr) stays visible with `cargo test -- --nocapture`.
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!("{} failed: {}", script.display(), output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().rev().find(|line| !line.trim().is_empty()) {
        Some(line) => Ok(PathBuf::from(line.trim())),
        None => Err(format!("{} printed no kernel tree path", script.display())),
    }
}

/// The kernel module, `<repo>/kmod/sanblk.ko`. Panics if it has not been built.
pub fn module_path() -> PathBuf {
    let module = repo_root().join("kmod/sanblk.ko");
    assert!(
        module.is_file(),
        "{} is missing: run `make kmod` first",
        module.display()
    );
    module
}

/// `<repo>/target/debug/<name>`: a workspace binary the guest can execute directly.
pub fn target_bin(name: &str) -> PathBuf {
    // Host-only benchmarks run release builds (`make bench` sets this); guests and tests
    // use the debug ones.
    match std::env::var_os("SANBLK_HOST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => repo_root().join("target/debug").join(name),
    }
}

/// The relay QEMU runs for each guest connection to a forwarded port
/// (`src/bin/sanblk-guestfwd-relay.rs`), from the debug build that `make build` and
/// `cargo test` make.
pub fn guestfwd_relay() -> Result<PathBuf, HarnessError> {
    let relay = repo_root().join("target/debug/sanblk-guestfwd-relay");
    if relay.is_file() {
        Ok(relay)
    } else {
        Err(HarnessError::Config(format!(
            "{} is missing: run `make build` (or `cargo build -p sanblk-tests`) first",
            relay.display()
        )))
    }
}

/// `<repo>/target/qemu-scratch`, the parent of every [`scratch_dir`]: guests mount it at the
/// same path as a share of its own, uncached, as the host writes into it while guests run.
pub fn scratch_root() -> PathBuf {
    repo_root().join("target/qemu-scratch")
}

/// A fresh, empty directory `<repo>/target/qemu-scratch/<name>-<pid>-<counter>` for a test's
/// disk images and host-side files. Guests see it at the same path (read-only, through the
/// scratch share; write through disks or `$SANBLK_OUT`).
pub fn scratch_dir(name: &str) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = scratch_root().join(format!(
        "{}-{}-{}",
        sanitize_name(name),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `name` with everything but ASCII letters, digits, '-' and '_' replaced by '_', so it is
/// safe in file names, QEMU options and the kernel command line.
pub(crate) fn sanitize_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Creates (or truncates) `path` as a sparse file of `bytes` bytes, e.g. a SAN disk image.
pub fn sparse_image(path: &Path, bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(bytes)
}

/// Creates (or truncates) `path` as an image of `bytes` bytes (rounded down to whole MiB)
/// filled with a non-zero pattern: unlike a sparse image every block is allocated on the
/// host, so benchmark targets start in the same state (no hole reads, no allocation on
/// first write) and reads hit real data.
pub fn filled_image(path: &Path, bytes: u64) -> io::Result<()> {
    const MIB: u64 = 1 << 20;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk: Vec<u8> = (0..MIB)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8 | 1)
        .collect();
    for _ in 0..bytes / MIB {
        io::Write::write_all(&mut file, &chunk)?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_root_holds_the_workspace() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(guest_init().is_file());
    }

    #[test]
    fn sparse_image_has_requested_size() {
        let path = std::env::temp_dir().join(format!("sanblk-sparse-{}.img", std::process::id()));
        sparse_image(&path, 64 << 20).expect("create sparse image");
        let len = std::fs::metadata(&path).expect("stat image").len();
        std::fs::remove_file(&path).expect("remove image");
        assert_eq!(len, 64 << 20);
    }
}
