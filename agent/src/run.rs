//! `gammaray-agent run`: preflight, load and attach, serve the proxy and the control socket
//! until SIGTERM or SIGINT, then detach.

use std::{path::PathBuf, sync::Arc};

use crate::{
    admin, control, ebpf, enrolment, generation, kube_client, kube_source, manifests, node_ca, preflight,
    status_writer, translate,
};

use anyhow::Context as _;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub node: String,
    /// The node proxy: its outbound listener (the eBPF program redirects to it, so an IPv4
    /// address), the HBONE port, the trust domain and its tuning. Its node name is `node`.
    pub proxy: gammaray_proxy::ProxyConfig,
    /// cgroup2 directory to attach at; detected from /proc/self/mountinfo when `None`.
    pub cgroup_root: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub btf_path: PathBuf,
    /// Worker threads of the proxy's runtime.
    pub proxy_threads: usize,
    /// Directory of Kubernetes manifests to route by (the source without a cluster).
    pub manifests: Option<PathBuf>,
    /// Where the node CA comes from; `None` leaves traffic between nodes plaintext.
    pub signer: Option<SignerChoice>,
    /// The token proving to the signer that this agent is its node's.
    pub signer_token: PathBuf,
    /// Where /healthz and /readyz are served (and /config_dump, to the node's loopback only).
    pub admin_addr: std::net::SocketAddr,
    /// Where /metrics is served; the admin listener serves it too when the addresses agree.
    pub metrics_addr: std::net::SocketAddr,
    /// The Kubernetes API, when the agent runs against a cluster (and no manifest directory).
    pub kube: Option<KubeSettings>,
    /// Where the host's processes are (pods' network namespaces are found through it).
    pub proc_root: PathBuf,
    /// How long a shutdown waits for the proxy's connections to finish.
    pub drain_timeout: std::time::Duration,
    /// Where the eBPF maps and links are pinned.
    pub bpffs: PathBuf,
    /// With no live proxy, enrolled connections are refused or go direct; `None` chooses by
    /// whether traffic between nodes is mutual TLS (refused when it is).
    pub failure_mode: Option<ebpf::FailureMode>,
}

/// How often the proxy says, to the kernel side, that it is serving.
const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// How long after the last heartbeat the kernel side holds the proxy for dead: five beats, so
/// a busy moment of the agent never reads as a death.
const LIVENESS: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct KubeSettings {
    pub access: kube_client::Access,
    /// The Lease whose holder writes route status (its namespace is the signer's too).
    pub lease: status_writer::LeaseConfig,
}

/// Where the node CA comes from.
#[derive(Debug, Clone)]
pub enum SignerChoice {
    /// A local signer's Unix socket.
    Local(PathBuf),
    /// CertificateSigningRequests on the cluster the agent watches.
    Kube,
}

/// How long a starting agent waits for the signer's trust bundle.
const SIGNER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the agent until `shutdown` completes.
pub async fn run(cfg: RunConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    tokio::pin!(shutdown);
    preflight::check_privileges()?;
    preflight::check_btf(&cfg.btf_path)?;
    let cgroup_root = match &cfg.cgroup_root {
        Some(path) => {
            preflight::check_cgroup2(path)?;
            path.clone()
        }
        None => preflight::detect_cgroup2(std::path::Path::new("/proc/self/mountinfo"))?,
    };

    let proxy_addr = match cfg.proxy.outbound_addr {
        std::net::SocketAddr::V4(addr) => addr,
        addr => anyhow::bail!("the outbound listener {addr} must be an IPv4 address"),
    };
    // Until a source publishes, the empty generation makes every destination pass through.
    let options = translate::Options { trust_domain: cfg.proxy.trust_domain.clone(), version: 0 };
    let (out, config) = generation::Publisher::new(options);
    // The manifest directory wins when given; else the cluster, when there is one.
    let kube = match (&cfg.manifests, &cfg.kube) {
        (None, Some(k)) => Some((kube_client::client(&k.access).await?, k.clone())),
        _ => None,
    };
    let source = match (&cfg.manifests, &kube) {
        (Some(dir), _) => {
            Some(tokio::spawn(manifests::watch_dir(dir.clone(), out, std::time::Duration::from_millis(250))))
        }
        (None, Some((client, _))) => {
            tracing::info!("routing by the Kubernetes API");
            Some(tokio::spawn(kube_source::run(client.clone(), Default::default(), out)))
        }
        (None, None) => {
            tracing::warn!(
                "no configuration source (--manifests, --kubeconfig or in-cluster): nothing is routed"
            );
            None
        }
    };
    // The trust bundle first (handshakes check peers against it), then the node CA, asked of
    // the signer in the background: until it comes, handshakes fail and the agent is not
    // ready; nothing goes plaintext.
    let node_ca = match (&cfg.signer, &kube) {
        (None, _) => None,
        (Some(SignerChoice::Local(socket)), _) => Some(node_ca::Way::Local(socket.clone())),
        (Some(SignerChoice::Kube), Some((client, settings))) => {
            Some(node_ca::Way::Kube { client: client.clone(), namespace: settings.lease.namespace.clone() })
        }
        (Some(SignerChoice::Kube), None) => {
            anyhow::bail!("--signer kubernetes needs a cluster (--kubeconfig, or running in a pod)")
        }
    }
    .map(|way| node_ca::NodeCa {
        way,
        token: cfg.signer_token.clone(),
        node: cfg.node.clone(),
        trust_domain: cfg.proxy.trust_domain.clone(),
    });
    let (certs, _node_ca_task) = match node_ca {
        Some(node_ca) => {
            let bundle = node_ca.first_bundle(SIGNER_WAIT).await?;
            tracing::info!(signer = ?node_ca.way, roots = bundle.len(), "trust bundle loaded; asking the signer for this node's CA");
            let trust = Arc::new(gammaray_proxy::identity::Trust::new(bundle));
            let certs = Arc::new(gammaray_proxy::identity::CertStore::new(trust));
            let every = match node_ca.way {
                node_ca::Way::Local(_) => std::time::Duration::from_millis(500),
                node_ca::Way::Kube { .. } => std::time::Duration::from_secs(2),
            };
            let task = tokio::spawn(node_ca.run(certs.clone(), every));
            // The node CA before the data path: an agent that takes over from another (an
            // upgrade) must not take its traffic before it can carry it between nodes. Bounded:
            // without a signer the agent starts all the same, not ready, refusing what needs mTLS.
            let deadline = tokio::time::Instant::now() + SIGNER_WAIT;
            while certs.issuer().is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if certs.issuer().is_none() {
                tracing::warn!(
                    "no node CA from the signer after {SIGNER_WAIT:?}: starting without one; traffic between nodes is refused until it comes"
                );
            }
            (Some(certs), Some(crate::signer::AbortOnDrop(task)))
        }
        None => {
            tracing::warn!("no signer (--signer): traffic between nodes is NOT encrypted");
            (None, None)
        }
    };

    // Attached (or adopted from an earlier agent, whose enrolment and links keep working
    // meanwhile). A fresh attachment has no pod enrolled: nothing is redirected until
    // enrolment starts, after the proxy's listeners are bound.
    let failure = cfg.failure_mode.unwrap_or(if certs.is_some() {
        ebpf::FailureMode::Closed
    } else {
        ebpf::FailureMode::Open
    });
    let settings = ebpf::Settings {
        node: cfg.node.clone(),
        pins: ebpf::Pins::new(&cfg.bpffs),
        failure,
        liveness: LIVENESS,
    };
    let mut datapath = ebpf::Datapath::load(&cgroup_root, proxy_addr, &settings)?;
    let logger = datapath.take_logger();
    let kernel_logs = logger.map(|l| tokio::spawn(ebpf::forward_kernel_logs(l)));
    allow_listener_handover();

    // The proxy runs on a runtime of its own, so a burst of traffic never starves the agent's
    // control work, and the agent's work never adds latency to requests.
    let proxy_rt = ProxyRuntime::start(cfg.proxy_threads).context("cannot start the proxy runtime")?;
    let limits = descriptor_limits();
    let proxy_config = gammaray_proxy::ProxyConfig {
        node: Some(cfg.node.clone()),
        max_connections: limits.max_connections,
        max_connections_per_source: limits.max_connections_per_source,
        ..cfg.proxy.clone()
    };
    let inputs = gammaray_proxy::Inputs {
        snapshot: config.snapshot.clone(),
        lookup: datapath.orig_dst_lookup(),
        certs: certs.clone(),
    };
    // The proxy serves only once it routes by the cluster's configuration: a proxy with none
    // would pass connections straight to their destinations, in plaintext. Until then its
    // ports stay unbound (an agent taking over leaves them to its predecessor) and it does not
    // beat (the kernel side applies the failure mode).
    if source.is_some() {
        tracing::info!("waiting for the first configuration before serving");
        let mut first = config.generation.clone();
        tokio::select! {
            _ = first.wait_for(|g| g.version > 0) => {}
            () = &mut shutdown => {
                tracing::info!("shutting down before serving");
                return Ok(());
            }
        }
    }
    let proxy = Arc::new(gammaray_proxy::Proxy::start(proxy_config, inputs, &proxy_rt.handle())?);

    let state = Arc::new(control::State {
        node: cfg.node.clone(),
        proxy: proxy_addr,
        datapath,
        outbound: proxy.stats().clone(),
        generation: config.generation.clone(),
        mtls: certs.is_some(),
        status_refused: Default::default(),
    });
    let readiness = Arc::new(admin::Readiness { expects_config: source.is_some(), certs });
    // Health and the configuration on one listener, metrics on another unless they share it.
    let shared = cfg.metrics_addr == cfg.admin_addr;
    let mut surfaces = vec![(cfg.admin_addr, "admin", admin::Surfaces { health: true, metrics: shared })];
    if !shared {
        surfaces.push((cfg.metrics_addr, "metrics", admin::Surfaces { health: false, metrics: true }));
    }
    // (health listener alone?, task)
    let mut admin = Vec::new();
    for (addr, what, surfaces) in surfaces {
        let listener =
            bind_shared(addr).with_context(|| format!("cannot bind the {what} endpoint on {addr}"))?;
        let health_only = surfaces.health && !surfaces.metrics;
        admin.push((
            health_only,
            tokio::spawn(admin::serve(listener, state.clone(), readiness.clone(), surfaces)),
        ));
    }
    // Pods of labelled namespaces on this node follow the objects, whichever the source.
    let enrolment = source.is_some().then(|| {
        tokio::spawn(enrolment::run(
            cfg.node.clone(),
            state.clone(),
            proxy.clone(),
            config.generation.clone(),
            cfg.proc_root.clone(),
            std::time::Duration::from_millis(500),
        ))
    });
    let (stop_writer, stop_writer_rx) = tokio::sync::watch::channel(false);
    let status_writer = kube.as_ref().map(|(client, settings)| {
        tokio::spawn(status_writer::run(
            client.clone(),
            settings.lease.clone(),
            config.generation.clone(),
            stop_writer_rx,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
            state.status_refused.clone(),
        ))
    });
    let (control_listener, control_inode) = control::bind(&cfg.control_socket)?;
    let mut control = tokio::spawn(control::serve(control_listener, state.clone()));
    // The kernel side steers to this proxy while it beats; an agent taking over beats too.
    let heartbeat = proxy_rt.handle().spawn({
        let state = state.clone();
        async move {
            let mut every = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                every.tick().await;
                if let Err(err) = state.datapath.beat() {
                    tracing::warn!(error = %err, "cannot write the proxy's heartbeat");
                }
            }
        }
    });
    if enrolment.is_none() {
        // No enrolment pass to wait for: links of an older ABI move now.
        state.datapath.complete_swap()?;
    }
    let trim = tokio::spawn(crate::memory::trim_after_bursts(std::time::Duration::from_secs(5)));
    tracing::info!(
        node = %cfg.node, proxy = %proxy_addr, adoption = ?state.datapath.attachment().adoption,
        took_ms = started.elapsed().as_millis() as u64, "agent ready"
    );

    tokio::select! {
        () = &mut shutdown => tracing::info!("shutting down"),
        res = &mut control => match res {
            Ok(Err(err)) => tracing::error!(error = %err, "control socket stopped"),
            _ => tracing::error!("control socket task ended"),
        },
    }
    // Hand the status Lease over before anything else stops.
    let _ = stop_writer.send(true);
    if let Some(writer) = status_writer {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), writer).await;
    }
    // Connections in flight finish before the proxy goes. The heartbeat stops with the
    // listeners: an agent taking over keeps the kernel side steering to its own; with none,
    // the failure mode applies once the liveness window passes (the programs stay attached).
    heartbeat.abort();
    // The health listener closes too: an agent taking over shares its port (SO_REUSEPORT), and
    // the kubelet's probes of the new pod must reach the new agent, not this one's "draining".
    // Metrics stay served on their own listener while the drain lasts.
    for (health_only, task) in &admin {
        if *health_only {
            task.abort();
        }
    }
    // Enrolment stops before the drain: it makes no capture listener for a proxy that no
    // longer accepts, and the pods' capture listeners close with it, so the kernel refers new
    // inbound connections to an agent taking over (or applies the failure mode).
    if let Some(task) = enrolment {
        task.abort();
        let _ = task.await;
    }
    tracing::info!(
        connections = proxy.connections(),
        deadline_secs = cfg.drain_timeout.as_secs(),
        "draining: the proxy accepts no more connections; those open may finish"
    );
    let drained = proxy.drain(cfg.drain_timeout).await;
    if drained.left == 0 {
        tracing::info!(took_ms = drained.took.as_millis() as u64, "drained: every connection finished");
    } else {
        tracing::warn!(
            left = drained.left,
            took_ms = drained.took.as_millis() as u64,
            "drain deadline passed: closing the connections left"
        );
    }
    control.abort();
    let _ = control.await;
    for (_, task) in admin {
        task.abort();
        let _ = task.await;
    }
    if let Some(task) = source {
        task.abort();
    }
    trim.abort();
    if let Some(task) = kernel_logs {
        task.abort();
        let _ = task.await;
    }
    drop(proxy);
    proxy_rt.shutdown();
    // Unless an agent that took over has bound its own since.
    if std::fs::metadata(&cfg.control_socket).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.ino() == control_inode
    }) {
        let _ = std::fs::remove_file(&cfg.control_socket);
    }
    // The links and maps stay pinned: pods keep the failure mode until an agent adopts them,
    // or `gammaray-agent uninstall` removes them.
    tracing::info!(pins = %cfg.bpffs.display(), "stopped; the eBPF programs stay attached");
    Ok(())
}

/// A listener on `addr` that another agent on the node may bind beside this one
/// (`SO_REUSEPORT`), so an upgrade overlaps the two.
fn bind_shared(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Asks the kernel to move connections waiting in a closing listener's queue to another
/// listener of its `SO_REUSEPORT` group (`net.ipv4.tcp_migrate_req`, Linux 5.14): without it,
/// the connections a draining agent had not accepted yet are reset. The sysctl is the node's
/// network namespace's.
fn allow_listener_handover() {
    let path = std::path::Path::new("/proc/sys/net/ipv4/tcp_migrate_req");
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(path, "1") {
            Ok(()) => tracing::info!(
                "set net.ipv4.tcp_migrate_req=1: a draining agent's queued connections move to its successor"
            ),
            Err(err) => {
                tracing::warn!(error = %err, "cannot set net.ipv4.tcp_migrate_req: connections queued at an upgrade may be reset")
            }
        },
        Err(err) => {
            tracing::warn!(error = %err, "no net.ipv4.tcp_migrate_req (Linux 5.14): connections queued at an upgrade may be reset")
        }
    }
}

/// What the agent's descriptors allow the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
}

impl Limits {
    /// For a process that may hold `nofile` descriptors: a proxied connection costs up to two
    /// (the client's and the upstream's), and an eighth (at least 256, at most 4096) is kept
    /// for the agent's own work, so the API watches, the manifests and the admin endpoints
    /// never run out when pods hold every connection they may. One source may hold a quarter,
    /// and never more than 16 384: a pod with more open at once is misbehaving, and each costs
    /// the proxy memory as well as descriptors.
    pub fn for_descriptors(nofile: u64) -> Self {
        let reserve = (nofile / 8).clamp(256, 4096);
        let max_connections = (nofile.saturating_sub(reserve) / 2).max(1) as usize;
        Self { max_connections, max_connections_per_source: (max_connections / 4).clamp(1, 16_384) }
    }
}

/// Raises the soft limit on open descriptors to the hard one, and derives the proxy's limits
/// from what it then is; logs both.
fn descriptor_limits() -> Limits {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    let soft = match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(err) => {
            tracing::warn!(error = %err, soft, hard, "cannot raise the descriptor limit; keeping the soft one");
            soft
        }
    };
    let limits = Limits::for_descriptors(soft);
    tracing::info!(
        nofile = soft,
        hard,
        max_connections = limits.max_connections,
        max_connections_per_source = limits.max_connections_per_source,
        "descriptor limit and the proxy's connection limits"
    );
    limits
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// The data path's own runtime, apart from the control plane's.
///
/// With one thread (the default) it is a current-thread runtime on a thread of its own: a task
/// that another task wakes runs after the tasks already ready, not at once as the multi-thread
/// scheduler's LIFO slot would run it. So when one epoll wakeup readies several client
/// connections, each queues its frames and a shared HBONE connection flushes them together, in
/// one TLS write, instead of once per request. More threads mean a multi-thread runtime.
enum ProxyRuntime {
    Single {
        handle: tokio::runtime::Handle,
        /// Sent (or dropped) to end the runtime's thread.
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    },
    Multi(tokio::runtime::Runtime),
}

impl ProxyRuntime {
    fn start(threads: usize) -> anyhow::Result<Self> {
        if threads > 1 {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("proxy")
                .enable_all()
                .on_thread_park(crate::logging::flush_on_park)
                .build()?;
            return Ok(Self::Multi(rt));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::logging::flush_on_park)
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("proxy".into()).spawn(move || {
            rt.block_on(async move {
                let _ = stopped.await;
            });
            rt.shutdown_background();
        })?;
        Ok(Self::Single { handle, stop, thread })
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match self {
            Self::Single { handle, .. } => handle.clone(),
            Self::Multi(rt) => rt.handle().clone(),
        }
    }

    fn shutdown(self) {
        match self {
            Self::Single { stop, thread, .. } => {
                let _ = stop.send(());
                // Quick: the thread only drops the runtime's tasks, without waiting for them.
                let _ = thread.join();
            }
            Self::Multi(rt) => rt.shutdown_background(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use super::ProxyRuntime;
    use crate::logging::Batched;

    static WRITTEN: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    fn sink(bytes: &[u8]) {
        WRITTEN.lock().unwrap().push(bytes.to_vec());
    }

    /// The proxy's runtimes, both kinds, have their threads write log lines in batches: a line
    /// logged by a task is kept while the task runs and written once its thread goes idle.
    #[test]
    fn connection_limits_leave_room_for_the_agent_and_share_the_rest() {
        use super::Limits;
        let l = Limits::for_descriptors(1_048_576);
        assert_eq!(l, Limits { max_connections: 522_240, max_connections_per_source: 16_384 });
        let l = Limits::for_descriptors(65_536);
        assert_eq!(l.max_connections, (65_536 - 4_096) / 2, "at most 4096 kept back");
        let l = Limits::for_descriptors(1024);
        assert_eq!(l.max_connections, (1024 - 256) / 2, "at least 256 kept back");
        assert_eq!(l.max_connections_per_source, (1024 - 256) / 2 / 4, "a quarter to one source");
        assert_eq!(Limits::for_descriptors(100).max_connections, 1, "never zero");
    }

    #[test]
    fn the_proxy_runtimes_write_log_lines_when_they_go_idle() {
        for threads in [1, 2] {
            WRITTEN.lock().unwrap().clear();
            let rt = ProxyRuntime::start(threads).unwrap();
            let (tell, told) = std::sync::mpsc::channel();
            rt.handle().spawn(async move {
                // By now every thread of the runtime has gone idle once.
                tokio::time::sleep(Duration::from_millis(20)).await;
                std::io::Write::write_all(&mut Batched::new(sink), b"kept\n").unwrap();
                let while_busy = WRITTEN.lock().unwrap().len();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tell.send((while_busy, WRITTEN.lock().unwrap().clone()));
            });
            let (while_busy, written) = told.recv_timeout(Duration::from_secs(10)).expect("the task ran");
            rt.shutdown();
            assert_eq!(while_busy, 0, "{threads} thread(s): kept while the task ran");
            assert_eq!(
                written,
                [b"kept\n".to_vec()],
                "{threads} thread(s): written once the thread went idle"
            );
        }
    }
}
