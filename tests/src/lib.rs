//! QEMU harness for sanblk end-to-end tests.
//!
//! A test describes a guest with [`VmConfig`] (a shell script plus disks, forwarded ports and
//! resources) and runs it with [`run`], or [`spawn`] + [`RunningVm::wait`] to have several
//! guests up at once. The guest boots the project's debug kernel (KASAN, lockdep) on the
//! host's root filesystem, so host binaries (`target/debug/*`, `kmod/sanblk.ko`, fio,
//! dmsetup, busybox) run in the guest at their host paths. The script runs in `$SANBLK_OUT`
//! (`/run/sanblk-out` in the guest), which is the run's log directory on the host
//! ([`GuestOutcome::log_dir`]). Kernel splats in the serial log fail
//! [`GuestOutcome::assert_clean_success`] even when the script succeeded.
//!
//! Inside the guest (`qemu/guest-init.sh` is PID 1): the host's `/` read-only over 9p;
//! fresh proc, sysfs, devtmpfs and tmpfs on `/tmp`, `/run`, `/var/tmp`; `$SANBLK_OUT` =
//! `/run/sanblk-out` (read-write 9p, the host log dir, also the script's working directory;
//! the right place for files the host writes or reads while the guest runs, since the root
//! share is read-only); disks as `/dev/vda`, `/dev/vdb`, ... in the order added; `eth0` =
//! 10.0.2.15/24 with forwarded host ports at [`HOST_ADDR_FROM_GUEST`] (10.0.2.100);
//! `HOME=/tmp`, `DM_DISABLE_UDEV=1`, plus [`VmConfig::env`] variables. The script runs as
//! `sh script.sh`; its exit code comes back as [`GuestOutcome::exit_code`].
//!
//! ```no_run
//! use sanblk_tests::{run, VmConfig};
//! let outcome = run(&VmConfig::new("hello", "uname -r > uname.txt")).expect("guest ran");
//! outcome.assert_clean_success();
//! ```

pub mod bench;
pub mod blocks;
pub mod config;
pub mod dm_san;
pub mod error;
pub mod fio;
pub mod marker;
pub mod paths;
pub mod probe;
pub mod server;
pub mod splat;
pub mod unix_bridge;
pub mod vm;

pub use config::{Disk, VmConfig};
pub use error::{FailedRun, HarnessError};
pub use paths::{
    filled_image, guest_init, kernel_image, kernel_tree, module_path, repo_root, scratch_dir,
    sparse_image, target_bin,
};
pub use server::{paths_by_uuid, provision, Provisioned, SandServer};
pub use splat::find_splats;
pub use vm::{
    run, spawn, wait_for_file, wait_for_path, GuestOutcome, RunningVm, GUEST_OUT_DIR,
    HOST_ADDR_FROM_GUEST,
};
