//! What the bench reads off the machine: load generators run inside pods (oha, iperf3), CPU,
//! context switches and memory from /proc, a client's view of a weight change, and what one
//! wakeup costs.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gammaray_testkit::Pod;
use serde_json::Value;

/// One oha run's figures.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Load {
    pub rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub requests: f64,
    pub errors: f64,
}

/// CPU seconds (user + system) of these processes so far.
pub(super) fn cpu_of(pids: impl IntoIterator<Item = u32>, ticks: f64) -> f64 {
    pids.into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .sum()
}

/// Context switches (voluntary and not) of every thread of these processes so far: the wakeups
/// a request costs besides its own work.
pub(super) fn switches_of(pids: &[u32]) -> f64 {
    let mut switches = 0.0;
    for pid in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
        for task in tasks {
            let status = task.path().join("status");
            switches += ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"]
                .iter()
                .filter_map(|field| status_field(&status, field))
                .sum::<f64>();
        }
    }
    switches
}

/// The number in a field of a /proc status file (`Name:   value [unit]`).
pub(super) fn status_field(path: &Path, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(path).ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    value.split_whitespace().next()?.parse().ok()
}

/// A field of /proc/PID/status in MiB (VmRSS, VmHWM).
pub(super) fn mem_mib(pid: u32, field: &str) -> f64 {
    status_field(Path::new(&format!("/proc/{pid}/status")), field).map_or(0.0, |kb| kb / 1024.0)
}

pub(super) fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if path.is_empty() {
        bail!("{name} is not installed: run `bash scripts/setup.sh`");
    }
    Ok(PathBuf::from(path))
}

/// Runs `program args` in `pod`'s network namespace and returns its stdout.
pub(super) fn in_pod(pod: &Pod, program: &Path, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns_path().display()))
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!("{} {} failed: {}", program.display(), args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn oha(
    oha: &Path,
    pod: &Pod,
    target: &[String],
    conns: u32,
    rate: Option<u32>,
    duration: Duration,
) -> anyhow::Result<Load> {
    let mut args: Vec<String> = vec![
        "--no-tui".into(),
        "--output-format".into(),
        "json".into(),
        "-c".into(),
        conns.to_string(),
        "-z".into(),
        format!("{}ms", duration.as_millis()),
    ];
    if let Some(q) = rate {
        args.extend(["-q".into(), q.to_string(), "--latency-correction".into()]);
    }
    args.extend(target.iter().cloned());
    let out = in_pod(pod, oha, &args)?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("oha output: {out}"))?;
    let ms = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let total: f64 =
        v["statusCodeDistribution"].as_object().map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
    let ok = v["statusCodeDistribution"]["200"].as_f64().unwrap_or(0.0);
    // Requests cut off by the end of the run are not failures.
    let errors: f64 = v["errorDistribution"].as_object().map_or(0.0, |m| {
        m.iter().filter(|(k, _)| !k.contains("deadline")).filter_map(|(_, v)| v.as_f64()).sum()
    });
    Ok(Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: ms("p50"),
        p90_ms: ms("p90"),
        p99_ms: ms("p99"),
        requests: total,
        errors: errors + (total - ok),
    })
}

pub(super) fn iperf(iperf3: &Path, pod: &Pod, dst: SocketAddr, secs: u32) -> anyhow::Result<f64> {
    Ok(iperf_at(iperf3, pod, dst, secs, None)?.0)
}

/// One iperf3 stream from `pod` to `dst`, as fast as it goes or at most `gbits` Gbit/s; returns
/// the received rate in Gbit/s and the bytes received.
pub(super) fn iperf_at(
    iperf3: &Path,
    pod: &Pod,
    dst: SocketAddr,
    secs: u32,
    gbits: Option<f64>,
) -> anyhow::Result<(f64, f64)> {
    let mut args: Vec<String> =
        ["-c", &dst.ip().to_string(), "-p", &dst.port().to_string(), "-t", &secs.to_string(), "-J"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    if let Some(gbits) = gbits {
        args.extend(["-b".to_owned(), format!("{}M", (gbits * 1000.0) as u64)]);
    }
    let out = in_pod(pod, iperf3, &args)?;
    let v: Value = serde_json::from_str(&out).context("iperf3 output")?;
    let received = &v["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(bytes > 0.0, "iperf3 from {} to {dst} received nothing: {out}", pod.name);
    Ok((received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9, bytes))
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Which backend answered a GET on a keep-alive connection (the `x-backend` header).
pub(super) fn which_backend(conn: &mut BufReader<TcpStream>) -> anyhow::Result<String> {
    conn.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")?;
    let mut backend = String::new();
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "x-backend" => backend = v.trim().to_owned(),
                "content-length" => length = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body)?;
    Ok(backend)
}

/// Seconds until `n` consecutive answers come from `want`, asking from `pod` to `dst`.
pub(super) fn time_to_split(
    pod: &Pod,
    dst: SocketAddr,
    want: &str,
    n: usize,
    started: Instant,
) -> anyhow::Result<f64> {
    pod.run(|| -> anyhow::Result<f64> {
        let mut conn = BufReader::new(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?);
        conn.get_ref().set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut streak = 0;
        let mut first = None;
        while started.elapsed() < Duration::from_secs(60) {
            if which_backend(&mut conn)? == want {
                first.get_or_insert(started.elapsed());
                streak += 1;
                if streak == n {
                    return Ok(first.expect("set").as_secs_f64());
                }
            } else {
                streak = 0;
                first = None;
            }
        }
        bail!("the split never moved to {want}")
    })?
}

/// Microseconds from one thread writing a byte to another thread returning from its blocking
/// read, half a round trip over a Unix socket pair: with both threads pinned to CPU 0, and with
/// them pinned to CPUs 0 and 1. Reads time out after a second, so a lost wakeup cannot hang
/// the run.
pub(super) fn wakeup_cost(round_trips: usize) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::net::UnixStream;

    use nix::{sched::CpuSet, unistd::Pid};

    fn pin(cpu: usize) -> anyhow::Result<()> {
        let mut set = CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pin to CPU {cpu}"))
    }
    fn ping_pong(round_trips: usize, cpus: (usize, usize)) -> anyhow::Result<f64> {
        let (mut a, mut b) = UnixStream::pair()?;
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
        }
        let echo = std::thread::spawn(move || -> anyhow::Result<()> {
            pin(cpus.1)?;
            let mut byte = [0u8; 1];
            for _ in 0..round_trips {
                b.read_exact(&mut byte)?;
                b.write_all(&byte)?;
            }
            Ok(())
        });
        // Measured on a thread of its own, so pinning it leaves the caller's CPUs alone.
        let measured = std::thread::spawn(move || -> anyhow::Result<f64> {
            pin(cpus.0)?;
            let mut byte = [0u8; 1];
            let started = Instant::now();
            for _ in 0..round_trips {
                a.write_all(&byte)?;
                a.read_exact(&mut byte)?;
            }
            Ok(started.elapsed().as_secs_f64() * 1e6 / round_trips as f64 / 2.0)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))??;
        echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        Ok(measured)
    }
    if std::thread::available_parallelism()?.get() < 2 {
        bail!("one CPU only");
    }
    Ok((ping_pong(round_trips, (0, 0))?, ping_pong(round_trips, (0, 1))?))
}
