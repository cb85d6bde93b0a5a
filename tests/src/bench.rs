//! What the guest benchmarks (`src/bin/sanblk-bench-*`) share beside the fio jobs: settings
//! from the environment, and the kernel and module `make bench` builds for them.

use std::path::PathBuf;

use crate::{module_path, VmConfig};

/// The environment variable `name` as a number; `default` when it is unset or not a number.
pub fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `SANBLK_BENCH_MODULE` (the module built for the bench kernel), else the test module.
pub fn module() -> PathBuf {
    std::env::var_os("SANBLK_BENCH_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(module_path)
}

/// `config` booting `SANBLK_BENCH_KERNEL` (a bzImage; printed, since it decides what the
/// figures mean) when set, else the debug test kernel.
pub fn with_kernel(config: VmConfig) -> VmConfig {
    match std::env::var_os("SANBLK_BENCH_KERNEL") {
        Some(kernel) => {
            let kernel = PathBuf::from(kernel);
            println!("kernel: {}", kernel.display());
            config.kernel(kernel)
        }
        None => config,
    }
}
