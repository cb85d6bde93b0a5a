//! What a test guest looks like: script, disks, forwarded ports, resources.

use std::path::PathBuf;
use std::time::Duration;

/// A block device attached to the guest as virtio-blk (`/dev/vda`, `/dev/vdb`, ... in the
/// order added).
#[derive(Clone, Debug)]
pub enum Disk {
    /// A raw image file, attached shareable (`share-rw=on`, no host locking, `cache=none`) so
    /// the same file can be attached to two guests and read by the host test. I/O errors are
    /// reported to the guest instead of pausing the VM.
    ImageFile(PathBuf),
    /// A QEMU `-drive` option string, used as given plus `,if=none,id=<id>`: for drives that
    /// are not plain files, e.g. `file=nbd:127.0.0.1:10809,format=raw,cache=none,
    /// werror=report,rerror=report` in front of an nbdkit error-injection filter.
    RawDriveSpec(String),
    /// An [`Disk::ImageFile`] behind QEMU's I/O throttling: at most `iops` requests and
    /// `bytes_per_s` bytes per second, like a SAN LUN with a service limit. Benchmarks use it
    /// to compare drivers when the device, not the emulated CPU, is the bottleneck.
    ThrottledImageFile {
        path: PathBuf,
        iops: u32,
        bytes_per_s: u64,
    },
}

/// Configuration of one guest run. Build with [`VmConfig::new`] and the builder methods.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub(crate) name: String,
    pub(crate) script: String,
    pub(crate) disks: Vec<Disk>,
    pub(crate) forwarded_ports: Vec<u16>,
    pub(crate) memory_mb: u32,
    pub(crate) cpus: u32,
    pub(crate) timeout: Duration,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) kernel: Option<PathBuf>,
    pub(crate) kernel_args: Vec<String>,
    pub(crate) instruction_clock_shift: Option<u8>,
}

impl VmConfig {
    /// A guest named `name` (used in the log directory name) that runs `script` with `sh` as
    /// the only job after boot. The script runs in the out directory (`$SANBLK_OUT`), whose
    /// files the host test finds in `GuestOutcome::log_dir`.
    pub fn new(name: &str, script: &str) -> Self {
        VmConfig {
            name: name.to_string(),
            script: script.to_string(),
            disks: Vec::new(),
            forwarded_ports: Vec::new(),
            // KASAN's shadow memory and lockdep need room; 1 GiB boots comfortably.
            memory_mb: 1024,
            cpus: 2,
            // A bound for a hung guest, not a speed check: on a slow host with two guests
            // sharing 2 CPUs under TCG, the datapath layouts guest took over 300 s.
            timeout: Duration::from_secs(900),
            env: Vec::new(),
            kernel: None,
            kernel_args: Vec::new(),
            instruction_clock_shift: None,
        }
    }

    /// Attaches a raw image file as the next virtio-blk disk.
    pub fn disk(self, path: impl Into<PathBuf>) -> Self {
        self.disk_spec(Disk::ImageFile(path.into()))
    }

    /// Attaches any [`Disk`] as the next virtio-blk disk.
    pub fn disk_spec(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Makes the host's `127.0.0.1:port` reachable from the guest as `10.0.2.100:port`
    /// (a new host connection per guest connection).
    pub fn forward_port(mut self, port: u16) -> Self {
        self.forwarded_ports.push(port);
        self
    }

    pub fn memory_mb(mut self, megabytes: u32) -> Self {
        self.memory_mb = megabytes;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Wall-clock limit for the whole run, boot included; QEMU is killed when it is exceeded.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Exports `key=value` to the guest script (`key` must be a shell variable name).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Boots this bzImage instead of the one from `qemu/build-kernel.sh`.
    pub fn kernel(mut self, bzimage: impl Into<PathBuf>) -> Self {
        self.kernel = Some(bzimage.into());
        self
    }

    /// Appends a kernel command-line parameter (e.g. `sanblk.dyndbg=+p`).
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_string());
        self
    }

    /// Runs the guest on QEMU's instruction-counting clock (`-icount shift=N,sleep=on`): guest
    /// time advances 2^N ns per executed instruction (idle time still passes in real time),
    /// so a CPU-bound guest measures its work in instructions, not in the host's varying speed.
    pub fn instruction_clock(mut self, shift: u8) -> Self {
        self.instruction_clock_shift = Some(shift);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}
