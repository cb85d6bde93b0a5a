//! fio jobs shared by the guest benchmarks (`src/bin/sanblk-bench-*`): the job set, the guest
//! command line of one run (JSON output in `$SANBLK_OUT`), reading the figure back, medians.

/// One fio workload.
pub struct Job {
    pub name: &'static str,
    pub args: &'static str,
    pub metric: Metric,
}

#[derive(Clone, Copy)]
pub enum Metric {
    ReadBandwidth,
    WriteBandwidth,
    ReadIops,
    WriteIops,
}

impl Metric {
    pub fn unit(self) -> &'static str {
        match self {
            Metric::ReadBandwidth | Metric::WriteBandwidth => "MiB/s",
            Metric::ReadIops | Metric::WriteIops => "IOPS",
        }
    }
}

/// Sequential 1 MiB at QD8 and random 4 KiB at QD32, reads and writes.
pub const JOBS: [Job; 4] = [
    Job {
        name: "seq-read-1M",
        args: "--rw=read --bs=1M --iodepth=8",
        metric: Metric::ReadBandwidth,
    },
    Job {
        name: "seq-write-1M",
        args: "--rw=write --bs=1M --iodepth=8",
        metric: Metric::WriteBandwidth,
    },
    Job {
        name: "rand-read-4k-qd32",
        args: "--rw=randread --bs=4k --iodepth=32",
        metric: Metric::ReadIops,
    },
    Job {
        name: "rand-write-4k-qd32",
        args: "--rw=randwrite --bs=4k --iodepth=32",
        metric: Metric::WriteIops,
    },
];

/// How fio submits its I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Linux AIO: every I/O is issued from the `io_submit` call, which may wait.
    Libaio,
    /// io_uring: I/O is issued inline with REQ_NOWAIT where the device takes it, else by
    /// io_uring's worker threads.
    IoUring,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Libaio => "libaio",
            Engine::IoUring => "io_uring",
        }
    }
}

/// The guest shell line running `job` on `device` for `runtime_s` seconds (1 s ramp, direct
/// I/O through `engine`), its JSON written to [`output_name`]. `extra` is appended (e.g.
/// `--size=256M`).
pub fn command(
    job: &Job,
    engine: Engine,
    target: &str,
    device: &str,
    extra: &str,
    runtime_s: u32,
    round: u32,
) -> String {
    format!(
        "fio --name={name} --filename={device} {extra} {args} --direct=1 --ioengine={engine} \
         --runtime={runtime_s} --time_based --ramp_time=1 --eta=never --output-format=json \
         --output={output}\n",
        name = job.name,
        args = job.args,
        engine = engine.name(),
        output = output_name(target, job, round),
    )
}

/// `targets` in round `round`'s order: each round starts one further along, so drift over the
/// run does not always fall on the same target.
pub fn rotated<T>(targets: &[T], round: u32) -> impl Iterator<Item = &T> {
    let start = round as usize % targets.len().max(1);
    targets[start..].iter().chain(&targets[..start])
}

/// The out-file name of one run.
pub fn output_name(target: &str, job: &Job, round: u32) -> String {
    format!("{target}-{}-{round}.json", job.name)
}

/// The job's figure (MiB/s or IOPS) from fio's JSON output.
pub fn value(json: &str, metric: Metric) -> Result<f64, String> {
    let parsed: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("fio json: {e}"))?;
    let job = &parsed["jobs"][0];
    let number = |v: &serde_json::Value| {
        v.as_f64()
            .ok_or_else(|| format!("fio json lacks a field: {v}"))
    };
    match metric {
        Metric::ReadBandwidth => number(&job["read"]["bw"]).map(|kib| kib / 1024.0),
        Metric::WriteBandwidth => number(&job["write"]["bw"]).map(|kib| kib / 1024.0),
        Metric::ReadIops => number(&job["read"]["iops"]),
        Metric::WriteIops => number(&job["write"]["iops"]),
    }
}

/// The median (upper median for an even count); NaN for no samples.
pub fn median(mut samples: Vec<f64>) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The `q` quantile (0.0..=1.0, nearest rank); NaN for no samples.
pub fn quantile(mut samples: Vec<f64>, q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = (q * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let samples: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(samples.clone(), 0.5), 10.0);
        assert_eq!(quantile(samples.clone(), 0.99), 20.0);
        assert_eq!(quantile(samples.clone(), 1.0), 20.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn the_engine_is_passed_to_fio() {
        let line = |engine| command(&JOBS[2], engine, "raw", "/dev/vda", "", 6, 0);
        assert!(line(Engine::Libaio).contains(" --ioengine=libaio "));
        assert!(line(Engine::IoUring).contains(" --ioengine=io_uring "));
        assert!(!line(Engine::IoUring).contains("libaio"));
    }

    #[test]
    fn rounds_start_one_target_further() {
        let order = |round| rotated(&['a', 'b', 'c'], round).collect::<String>();
        assert_eq!(order(0), "abc");
        assert_eq!(order(1), "bca");
        assert_eq!(order(5), "cab");
        assert_eq!(rotated::<char>(&[], 3).count(), 0);
    }

    #[test]
    fn reads_fio_json() {
        let json = r#"{"jobs":[{"read":{"bw":2048,"iops":10.5},"write":{"bw":0,"iops":0}}]}"#;
        assert_eq!(value(json, Metric::ReadBandwidth), Ok(2.0));
        assert_eq!(value(json, Metric::ReadIops), Ok(10.5));
    }
}
