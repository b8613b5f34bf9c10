//! Loading, attaching and driving the eBPF programs: the only place the agent touches the
//! kernel's maps.
//!
//! The kernel side outlives the agent: the maps and the two links are pinned in bpffs (see
//! [`Pins`]), so a pod's connections keep being steered while no agent runs, and a starting
//! agent adopts what is pinned: the maps when their ABI version is its own, and the links
//! always, moving them to its freshly loaded programs with `BPF_LINK_UPDATE`, which swaps the
//! program of a live link with no moment of none attached. Only `uninstall` removes the pins.
//!
//! Inbound capture adds a link per enrolled pod: the `sk_lookup` program attached to the pod's
//! network namespace (pinned as `link-inbound-COOKIE`), with the pod's entry in the
//! inbound-pods map and the node proxy's listener in the pod in the socket hash. A starting
//! agent moves each pod's link to its program when it sets the pod up; a link whose namespace
//! is gone (the pod ended while no agent ran) is unpinned.

use std::{
    ffi::CString,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, Program, SkLookup,
        links::{FdLink, PinnedLink},
    },
};
use gammaray_common::{
    ABI_VERSION, CONFIG_FLAG_ACTIVE, CONFIG_FLAG_FAIL_OPEN, COUNTER_CAPTURED, COUNTER_ERRORS,
    COUNTER_INBOUND_PASSED_NO_PROXY, COUNTER_INBOUND_REFUSED_NO_PROXY, COUNTER_LOOKUP_MISSES,
    COUNTER_PASSED_NO_PROXY, COUNTER_REDIRECTED, COUNTER_REFUSED_NO_PROXY, COUNTER_SKIPPED, ClientKey,
    Config, Enrolled, INBOUND_FLAG_STRICT, InboundPod, MAP_CLIENT_ORIG, MAP_CONFIG, MAP_COUNTERS,
    MAP_ENROLLED, MAP_HEARTBEAT, MAP_INBOUND_PODS, MAP_INBOUND_SOCKS, MAPS, OrigDst, PROG_CONNECT4,
    PROG_INBOUND, PROG_SOCKOPS,
};
use gammaray_proxy::orig_dst::{LookupError, OrigDstLookup};

/// Links made with bpf_link_create are always multi-attach in the kernel, which rejects the
/// ALLOW_MULTI flag on them (EINVAL): `Single` passes no flag, and other agents or tools
/// attached at the same cgroup keep running beside ours.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The eBPF object built by build.rs from the `ebpf/` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gammaray"));

/// How a pod's inbound link is pinned: this, then its netns cookie.
const INBOUND_LINK_PREFIX: &str = "link-inbound-";

/// `statfs(2)`'s type of a bpf file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("cannot start forwarding kernel log lines: {0}")]
    Log(#[source] aya_log::Error),
    #[error("cannot read link info: {0}")]
    Link(#[source] aya::programs::links::LinkError),
    #[error(
        "{dir} is not on a bpf file system: the agent pins its maps and links there so that they \
         outlive it; mount one (`mount -t bpf bpf /sys/fs/bpf`, or the DaemonSet's hostPath \
         /sys/fs/bpf) or pass --bpffs DIR"
    )]
    NotBpffs { dir: PathBuf },
    #[error(
        "the eBPF state pinned at {dir} belongs to node {owner}, not {node}: refusing to adopt it \
         (another agent's pins, or the node was renamed: `gammaray-agent uninstall --bpffs {dir}` \
         removes them)"
    )]
    Owner { dir: PathBuf, owner: String, node: String },
    #[error("{what} {path}: {source}")]
    Pin { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot read the monotonic clock: {0}")]
    Clock(#[source] std::io::Error),
}

/// Kernel counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelCounters {
    pub redirected: u64,
    pub skipped: u64,
    pub lookup_misses: u64,
    pub errors: u64,
    /// Enrolled connections refused while no node proxy was alive (failure mode `closed`).
    #[serde(default)]
    pub refused_no_proxy: u64,
    /// Enrolled connections let through directly while no node proxy was alive (`open`).
    #[serde(default)]
    pub passed_no_proxy: u64,
    /// Inbound connections to enrolled pods handed to the proxy's listener in the pod.
    #[serde(default)]
    pub captured: u64,
    /// Inbound connections to enrolled pods refused while no proxy listened in the pod.
    #[serde(default)]
    pub inbound_refused_no_proxy: u64,
    /// Inbound connections to enrolled pods let through uncaptured while no proxy listened in
    /// the pod (failure mode `open`, the pod `permissive`).
    #[serde(default)]
    pub inbound_passed_no_proxy: u64,
}

/// Identifiers of what the agent put into the kernel, so callers can check it is gone later.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub cgroup: PathBuf,
    pub link_ids: Vec<u32>,
    pub program_ids: Vec<u32>,
    /// Where the maps and links are pinned.
    #[serde(default)]
    pub pins: PathBuf,
    /// What the agent found pinned when it started.
    #[serde(default)]
    pub adoption: Adoption,
}

/// What a starting agent found pinned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Adoption {
    /// Nothing: it attached new links and created the maps.
    #[default]
    Fresh,
    /// Links and maps of its ABI version: it kept the maps (enrolment, destinations in flight)
    /// and moved the links to its programs.
    Adopted,
    /// Links with maps of another ABI version: it created new maps, and moves the links to its
    /// programs once its first enrolment pass has filled them; the old maps' pins go then.
    Replaced,
}

/// What happens to an enrolled pod's connection while no node proxy is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Refused at once (connect() fails with EPERM): nothing leaves the node unproxied.
    Closed,
    /// Sent directly to its destination, unproxied (plaintext, no routes), and counted.
    Open,
}

/// The pin layout under one directory (`--bpffs`, default `/sys/fs/bpf/gammaray`), one per
/// node and cgroup attached to:
///
/// - `node-NAME/`: an empty directory naming the node that owns the rest;
/// - `abi-N/GR_*`: the maps of ABI version N ([`ABI_VERSION`]);
/// - `link-gr_connect4`, `link-gr_sockops`: the two cgroup links;
/// - `link-inbound-COOKIE`: the `sk_lookup` link of the enrolled pod whose network namespace has
///   that cookie.
#[derive(Debug, Clone)]
pub struct Pins {
    pub dir: PathBuf,
}

impl Pins {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn owner_dir(&self, node: &str) -> PathBuf {
        self.dir.join(format!("node-{node}"))
    }

    fn abi_dir(&self) -> PathBuf {
        self.dir.join(format!("abi-{ABI_VERSION}"))
    }

    fn map(&self, name: &str) -> PathBuf {
        self.abi_dir().join(name)
    }

    fn link(&self, program: &str) -> PathBuf {
        self.dir.join(format!("link-{program}"))
    }

    fn inbound_link(&self, netns_cookie: u64) -> PathBuf {
        self.dir.join(format!("{INBOUND_LINK_PREFIX}{netns_cookie}"))
    }

    /// The pods' inbound links pinned here, by netns cookie.
    fn inbound_links(&self) -> Vec<(u64, PathBuf)> {
        self.entries()
            .into_iter()
            .filter_map(|n| {
                let cookie = n.strip_prefix(INBOUND_LINK_PREFIX)?.parse().ok()?;
                Some((cookie, self.dir.join(n)))
            })
            .collect()
    }

    /// The nodes named by `node-*` entries.
    fn owners(&self) -> Vec<String> {
        self.entries().into_iter().filter_map(|n| n.strip_prefix("node-").map(str::to_owned)).collect()
    }

    /// `abi-*` directories of other versions than this agent's.
    fn other_abis(&self) -> Vec<PathBuf> {
        let ours = format!("abi-{ABI_VERSION}");
        self.entries()
            .into_iter()
            .filter(|n| n.starts_with("abi-") && *n != ours)
            .map(|n| self.dir.join(n))
            .collect()
    }

    fn entries(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }

    /// Creates the directory, after checking it is on a bpf file system; the owner entry is
    /// made, or checked against `node`.
    fn prepare(&self, node: &str) -> Result<(), EbpfError> {
        let pin = pin_err;
        let mut probe = self.dir.as_path();
        while !probe.exists() {
            probe = probe.parent().unwrap_or(Path::new("/"));
        }
        let fs = nix::sys::statfs::statfs(probe).map_err(|e| pin("cannot stat", probe)(e.into()))?;
        if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
            return Err(EbpfError::NotBpffs { dir: self.dir.clone() });
        }
        std::fs::create_dir_all(&self.dir).map_err(pin("cannot create", &self.dir))?;
        match self.owners().into_iter().find(|o| o != node) {
            Some(owner) => Err(EbpfError::Owner { dir: self.dir.clone(), owner, node: node.to_owned() }),
            None => {
                let owner = self.owner_dir(node);
                if !owner.exists() {
                    std::fs::create_dir(&owner).map_err(pin("cannot create", &owner))?;
                }
                Ok(())
            }
        }
    }
}

fn pin_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EbpfError + use<> {
    let path = path.to_owned();
    move |source| EbpfError::Pin { what, path, source }
}

/// What `uninstall` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Removes every pin under `pins.dir`, links first (a link whose last reference goes detaches
/// its program), then the maps and the directory. An agent still running keeps its own
/// references until it exits.
pub fn uninstall(pins: &Pins) -> Result<Removed, EbpfError> {
    let mut removed = Removed::default();
    if !pins.dir.exists() {
        return Ok(removed);
    }
    let err = pin_err;
    let mut names = pins.entries();
    // Links before maps: the programs stop running before their maps go.
    names.sort_by_key(|n| !n.starts_with("link-"));
    for name in names {
        let path = pins.dir.join(&name);
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(err("cannot read", &path))?.flatten() {
                std::fs::remove_file(entry.path()).map_err(err("cannot remove", &entry.path()))?;
                removed.maps += 1;
            }
            std::fs::remove_dir(&path).map_err(err("cannot remove", &path))?;
        } else {
            std::fs::remove_file(&path).map_err(err("cannot remove", &path))?;
            if name.starts_with("link-") {
                removed.links += 1;
            }
        }
    }
    std::fs::remove_dir(&pins.dir).map_err(err("cannot remove", &pins.dir))?;
    Ok(removed)
}

/// How the agent loads the programs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub pins: Pins,
    pub failure: FailureMode,
    /// A heartbeat older than this means no proxy is alive.
    pub liveness: Duration,
}

/// Links of an older ABI waiting to be moved to this agent's programs.
struct PendingSwap {
    links: Vec<(PathBuf, &'static str)>,
}

/// The loaded programs, attached through pinned links, with handles on their maps.
pub struct Datapath {
    attachment: Attachment,
    pins: Pins,
    pending: Mutex<Option<PendingSwap>>,
    enrolled: Mutex<HashMap<MapData, u64, Enrolled>>,
    counters: PerCpuArray<MapData, u64>,
    heartbeat: Mutex<Array<MapData, u64>>,
    client_orig: Arc<Mutex<HashMap<MapData, ClientKey, OrigDst>>>,
    inbound_pods: Mutex<HashMap<MapData, u32, InboundPod>>,
    inbound_socks: Mutex<SockHash<MapData, u32>>,
    inherited: Mutex<Option<Inherited>>,
    logger: Option<aya_log::EbpfLogger<KernelLog>>,
    // Keeps the programs loaded (a link update needs their descriptors, an attachment the
    // program itself) and the maps open.
    ebpf: Mutex<Ebpf>,
}

/// What earlier agents left in the kernel when this one started: swept, once this agent's
/// enrolment shows which of it is still wanted ([`Datapath::sweep`]).
#[derive(Debug, Default, Clone)]
pub struct Inherited {
    enrolled: Vec<u64>,
    links: Vec<u64>,
    addresses: Vec<u32>,
}

/// What [`Datapath::sweep`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub enrolments: usize,
    pub links: usize,
    pub addresses: usize,
}

impl Swept {
    pub fn any(&self) -> bool {
        self.enrolments + self.links + self.addresses > 0
    }
}

/// One enrolled pod's inbound capture, as [`Datapath::capture`] sets it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture<'a> {
    pub netns_cookie: u64,
    pub netns: &'a Path,
    /// The pod's IPv4 addresses.
    pub ips: &'a [Ipv4Addr],
    /// Where the node's own connections to the pod come from: never captured.
    pub node_addr: Ipv4Addr,
    /// Peer authentication `strict`: with no proxy listener, always refused.
    pub strict: bool,
}

impl Datapath {
    /// Loads the object, points it at the node proxy's outbound listener, and attaches both
    /// programs to `cgroup_root` through pinned links beside any other programs there, or
    /// adopts the links pinned by an earlier agent (see the module's comment).
    pub fn load(cgroup_root: &Path, proxy: SocketAddrV4, settings: &Settings) -> Result<Self, EbpfError> {
        let pins = &settings.pins;
        pins.prepare(&settings.node)?;
        let abi_dir = pins.abi_dir();
        let maps_pinned = MAPS.iter().all(|m| pins.map(m).exists());
        let links_pinned = [PROG_CONNECT4, PROG_SOCKOPS].iter().all(|p| pins.link(p).exists());
        let adoption = match (links_pinned, maps_pinned) {
            (false, _) => Adoption::Fresh,
            (true, true) => Adoption::Adopted,
            (true, false) => Adoption::Replaced,
        };
        std::fs::create_dir_all(&abi_dir).map_err(|source| EbpfError::Pin {
            what: "cannot create",
            path: abi_dir.clone(),
            source,
        })?;
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&'static str, PathBuf)> = MAPS.iter().map(|m| (*m, pins.map(m))).collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog).map_err(EbpfError::Log)?;

        let mut config: Array<MapData, Config> = take_map(&mut ebpf, MAP_CONFIG)?;
        let mut flags = CONFIG_FLAG_ACTIVE;
        if settings.failure == FailureMode::Open {
            flags |= CONFIG_FLAG_FAIL_OPEN;
        }
        let cfg = Config {
            proxy_addr: u32::from(*proxy.ip()).to_be(),
            proxy_port: proxy.port().to_be(),
            flags,
            liveness_ns: settings.liveness.as_nanos() as u64,
            ..Config::default()
        };
        config.set(0, &cfg, 0).map_err(|source| EbpfError::Map { name: MAP_CONFIG, source })?;
        let enrolled: HashMap<MapData, u64, Enrolled> = take_map(&mut ebpf, MAP_ENROLLED)?;
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        let heartbeat = take_map(&mut ebpf, MAP_HEARTBEAT)?;
        let client_orig = take_map(&mut ebpf, MAP_CLIENT_ORIG)?;
        let inbound_pods: HashMap<MapData, u32, InboundPod> = take_map(&mut ebpf, MAP_INBOUND_PODS)?;
        let inbound_socks = take_map(&mut ebpf, MAP_INBOUND_SOCKS)?;
        let inherited = Inherited {
            enrolled: enrolled.keys().filter_map(Result::ok).collect(),
            links: pins.inbound_links().into_iter().map(|(cookie, _)| cookie).collect(),
            addresses: inbound_pods.keys().filter_map(Result::ok).collect(),
        };

        let cgroup = File::open(cgroup_root)
            .map_err(|source| EbpfError::Cgroup { path: cgroup_root.to_owned(), source })?;
        let mut program_ids = Vec::new();
        let mut pending = Vec::new();
        for name in [PROG_CONNECT4, PROG_SOCKOPS] {
            let err = |source| EbpfError::Program { name, source };
            let link_path = pins.link(name);
            let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing { kind: "program", name })?;
            let attach = |prog: &mut Program| -> Result<FdLink, EbpfError> {
                let link = match prog {
                    Program::CgroupSockAddr(p) => {
                        p.load().map_err(err)?;
                        let id = p.attach(&cgroup, ATTACH_MODE).map_err(err)?;
                        FdLink::try_from(p.take_link(id).map_err(err)?).map_err(EbpfError::Link)?
                    }
                    Program::SockOps(p) => {
                        p.load().map_err(err)?;
                        let id = p.attach(&cgroup, ATTACH_MODE).map_err(err)?;
                        FdLink::try_from(p.take_link(id).map_err(err)?).map_err(EbpfError::Link)?
                    }
                    _ => return Err(EbpfError::Missing { kind: "cgroup program", name }),
                };
                Ok(link)
            };
            match adoption {
                Adoption::Fresh => {
                    // A lone pin of one link (a crash between the two) is replaced.
                    let _ = std::fs::remove_file(&link_path);
                    let link = attach(prog)?;
                    link.pin(&link_path).map_err(|e| EbpfError::Pin {
                        what: "cannot pin link",
                        path: link_path.clone(),
                        source: std::io::Error::other(e),
                    })?;
                }
                Adoption::Adopted | Adoption::Replaced => {
                    load_only(prog, name)?;
                    if adoption == Adoption::Adopted {
                        swap(&link_path, program_fd(prog, name)?)?;
                    } else {
                        pending.push((link_path.clone(), name));
                    }
                }
            }
            program_ids.push(program_info_id(prog, name)?);
        }
        // Attached per pod as enrolment sets the pods up.
        let inbound = ebpf
            .program_mut(PROG_INBOUND)
            .ok_or(EbpfError::Missing { kind: "program", name: PROG_INBOUND })?;
        load_only(inbound, PROG_INBOUND)?;
        let link_ids = [PROG_CONNECT4, PROG_SOCKOPS]
            .iter()
            .map(|p| PinnedLink::from_pin(pins.link(p)).and_then(|l| FdLink::from(l).info()).map(|i| i.id()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(EbpfError::Link)?;
        tracing::info!(
            cgroup = %cgroup_root.display(), %proxy, ?link_ids, ?program_ids, pins = %pins.dir.display(),
            adoption = ?adoption, abi = ABI_VERSION, failure_mode = ?settings.failure,
            "eBPF programs attached"
        );
        let datapath = Self {
            attachment: Attachment {
                cgroup: cgroup_root.to_owned(),
                link_ids,
                program_ids,
                pins: pins.dir.clone(),
                adoption,
            },
            pins: pins.clone(),
            pending: Mutex::new((!pending.is_empty()).then_some(PendingSwap { links: pending })),
            enrolled: Mutex::new(enrolled),
            counters,
            heartbeat: Mutex::new(heartbeat),
            client_orig: Arc::new(Mutex::new(client_orig)),
            inbound_pods: Mutex::new(inbound_pods),
            inbound_socks: Mutex::new(inbound_socks),
            inherited: Mutex::new(Some(inherited)),
            logger: Some(logger),
            ebpf: Mutex::new(ebpf),
        };
        if adoption != Adoption::Replaced {
            datapath.remove_other_abis();
        }
        datapath.unpin_defunct_inbound_links();
        Ok(datapath)
    }

    /// Moves links still running an older ABI's programs to this agent's, now that its own
    /// maps hold the enrolment; then removes the older maps' pins. Does nothing when there
    /// is nothing to move.
    pub fn complete_swap(&self) -> Result<(), EbpfError> {
        let Some(pending) = self.pending.lock().expect("pending lock").take() else { return Ok(()) };
        let ebpf = self.ebpf.lock().expect("ebpf lock");
        for (path, name) in &pending.links {
            let prog = ebpf.program(name).ok_or(EbpfError::Missing { kind: "program", name })?;
            let fd = prog.fd().map_err(|source| EbpfError::Program { name, source })?;
            swap(path, fd.as_fd())?;
        }
        tracing::info!(links = pending.links.len(), abi = ABI_VERSION, "links moved to this ABI's programs");
        self.remove_other_abis();
        Ok(())
    }

    fn remove_other_abis(&self) {
        for dir in self.pins.other_abis() {
            let removed = std::fs::read_dir(&dir)
                .map(|entries| entries.flatten().filter(|e| std::fs::remove_file(e.path()).is_ok()).count())
                .unwrap_or(0);
            match std::fs::remove_dir(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), maps = removed, "removed the maps of another ABI version")
                }
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "cannot remove the maps of another ABI version")
                }
            }
        }
    }

    /// Says the node proxy is serving: connections of enrolled pods are steered to it until
    /// the liveness window passes without another beat.
    pub fn beat(&self) -> Result<(), EbpfError> {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `t` is a valid timespec to write; CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
        let now = match unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } {
            0 => t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64,
            _ => return Err(EbpfError::Clock(std::io::Error::last_os_error())),
        };
        self.heartbeat
            .lock()
            .expect("heartbeat lock")
            .set(0, &now, 0)
            .map_err(|source| EbpfError::Map { name: MAP_HEARTBEAT, source })
    }

    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    /// Takes the kernel log reader, to drive it from an async task.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<KernelLog>> {
        self.logger.take()
    }

    /// Steers the future connections of the namespace with this cookie to the proxy.
    pub fn enrol(&self, netns_cookie: u64) -> Result<(), EbpfError> {
        self.enrolled
            .lock()
            .expect("enrolled map lock")
            .insert(&netns_cookie, &Enrolled::default(), 0)
            .map_err(|source| EbpfError::Map { name: MAP_ENROLLED, source })
    }

    /// Stops steering the namespace. Returns whether it was enrolled.
    pub fn unenrol(&self, netns_cookie: u64) -> Result<bool, EbpfError> {
        match self.enrolled.lock().expect("enrolled map lock").remove(&netns_cookie) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(EbpfError::Map { name: MAP_ENROLLED, source }),
        }
    }

    /// Cookies of the enrolled namespaces.
    pub fn enrolled(&self) -> Vec<u64> {
        let map = self.enrolled.lock().expect("enrolled map lock");
        map.keys().filter_map(Result::ok).collect()
    }

    pub fn counters(&self) -> Result<KernelCounters, EbpfError> {
        let sum = |index: u32| -> Result<u64, EbpfError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|source| EbpfError::Map { name: MAP_COUNTERS, source })?;
            Ok(values.iter().sum())
        };
        Ok(KernelCounters {
            redirected: sum(COUNTER_REDIRECTED)?,
            skipped: sum(COUNTER_SKIPPED)?,
            lookup_misses: sum(COUNTER_LOOKUP_MISSES)?,
            errors: sum(COUNTER_ERRORS)?,
            refused_no_proxy: sum(COUNTER_REFUSED_NO_PROXY)?,
            passed_no_proxy: sum(COUNTER_PASSED_NO_PROXY)?,
            captured: sum(COUNTER_CAPTURED)?,
            inbound_refused_no_proxy: sum(COUNTER_INBOUND_REFUSED_NO_PROXY)?,
            inbound_passed_no_proxy: sum(COUNTER_INBOUND_PASSED_NO_PROXY)?,
        })
    }

    /// Captures the inbound connections to one pod: `listener` (a listening socket inside the
    /// pod's network namespace) takes those that do not come from the node. The socket and
    /// the pod's entry go in first, then the pod's `sk_lookup` link is attached and pinned, or,
    /// pinned by an earlier agent, moved to this agent's program: no connection finds the link
    /// without an entry. Called again for the same pod, it updates the entries (a new address,
    /// a change of peer authentication).
    pub fn capture(&self, pod: &Capture<'_>, listener: BorrowedFd<'_>) -> Result<(), EbpfError> {
        let entry = InboundPod {
            node_addr: u32::from(pod.node_addr).to_be(),
            flags: if pod.strict { INBOUND_FLAG_STRICT } else { 0 },
        };
        self.recapture(pod.ips, listener)?;
        let mut pods = self.inbound_pods.lock().expect("inbound pods lock");
        for ip in pod.ips {
            pods.insert(&u32::from(*ip).to_be(), &entry, 0)
                .map_err(|source| EbpfError::Map { name: MAP_INBOUND_PODS, source })?;
        }
        drop(pods);
        let path = self.pins.inbound_link(pod.netns_cookie);
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let err = |source| EbpfError::Program { name: PROG_INBOUND, source };
        let prog = ebpf
            .program_mut(PROG_INBOUND)
            .ok_or(EbpfError::Missing { kind: "program", name: PROG_INBOUND })?;
        if path.exists() {
            return swap(&path, program_fd(prog, PROG_INBOUND)?);
        }
        let prog: &mut SkLookup = prog.try_into().map_err(err)?;
        let netns = File::open(pod.netns).map_err(|source| EbpfError::Pin {
            what: "cannot open network namespace",
            path: pod.netns.to_owned(),
            source,
        })?;
        let id = prog.attach(&netns).map_err(err)?;
        let link = FdLink::from(prog.take_link(id).map_err(err)?);
        link.pin(&path).map_err(|e| EbpfError::Pin {
            what: "cannot pin link",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        Ok(())
    }

    /// Points a pod's addresses at `listener` in the socket hash: part of
    /// [`Datapath::capture`], and again later, where an agent that has since exited may have
    /// left no entry (its socket closed).
    pub fn recapture(&self, ips: &[Ipv4Addr], listener: BorrowedFd<'_>) -> Result<(), EbpfError> {
        let mut socks = self.inbound_socks.lock().expect("inbound socks lock");
        for ip in ips {
            socks
                .insert(&u32::from(*ip).to_be(), listener.as_raw_fd(), 0)
                .map_err(|source| EbpfError::Map { name: MAP_INBOUND_SOCKS, source })?;
        }
        Ok(())
    }

    /// Stops capturing for a pod that leaves the mesh: its link is unpinned (detached), its
    /// entries removed.
    pub fn release(&self, netns_cookie: u64, ips: &[Ipv4Addr]) -> Result<(), EbpfError> {
        let path = self.pins.inbound_link(netns_cookie);
        if let Err(err) = std::fs::remove_file(&path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            return Err(EbpfError::Pin { what: "cannot remove", path, source: err });
        }
        self.release_addresses(ips)
    }

    /// Removes the inbound entries of addresses no pod of this node has any more.
    pub fn release_addresses(&self, ips: &[Ipv4Addr]) -> Result<(), EbpfError> {
        for ip in ips {
            self.remove_address(u32::from(*ip).to_be())?;
        }
        Ok(())
    }

    fn remove_address(&self, key: u32) -> Result<(), EbpfError> {
        for (name, removed) in [
            (MAP_INBOUND_PODS, self.inbound_pods.lock().expect("inbound pods lock").remove(&key)),
            (MAP_INBOUND_SOCKS, self.inbound_socks.lock().expect("inbound socks lock").remove(&key)),
        ] {
            match removed {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(EbpfError::Map { name, source }),
            }
        }
        Ok(())
    }

    /// What earlier agents left when this one started; `None` after the first call.
    pub fn inherited(&self) -> Inherited {
        self.inherited.lock().expect("inherited lock").take().unwrap_or_default()
    }

    /// Removes, of what was `inherited`, the enrolments, inbound links and inbound addresses
    /// that this agent's enrolment does not hold (`cookies`, `ips`). Errors are logged: a
    /// sweep is tidying, and the next agent sweeps again.
    pub fn sweep(
        &self,
        inherited: &Inherited,
        cookies: &std::collections::HashSet<u64>,
        ips: &std::collections::HashSet<Ipv4Addr>,
    ) -> Swept {
        let mut swept = Swept::default();
        for cookie in inherited.enrolled.iter().filter(|c| !cookies.contains(c)) {
            match self.unenrol(*cookie) {
                Ok(true) => swept.enrolments += 1,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(netns_cookie = cookie, error = %err, "cannot remove a stale enrolment")
                }
            }
        }
        for cookie in inherited.links.iter().filter(|c| !cookies.contains(c)) {
            match std::fs::remove_file(self.pins.inbound_link(*cookie)) {
                Ok(()) => swept.links += 1,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::warn!(netns_cookie = cookie, error = %err, "cannot unpin a stale inbound link")
                }
            }
        }
        for key in inherited.addresses.iter().filter(|k| !ips.contains(&Ipv4Addr::from(u32::from_be(**k)))) {
            match self.remove_address(*key) {
                Ok(()) => swept.addresses += 1,
                Err(err) => tracing::warn!(error = %err, "cannot remove a stale inbound address"),
            }
        }
        swept
    }

    /// Unpins the inbound links whose network namespace is gone (pods that ended while no
    /// agent ran): the kernel detached them, and only the pin is left.
    pub fn unpin_defunct_inbound_links(&self) {
        for (cookie, path) in self.pins.inbound_links() {
            match bpf::obj_get(&path).and_then(|fd| bpf::link_netns_ino(fd.as_fd())) {
                Ok(0) => match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!(
                        netns_cookie = cookie,
                        "unpinned the inbound link of a pod that is gone"
                    ),
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err, "cannot unpin a defunct inbound link")
                    }
                },
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "cannot read a pinned inbound link")
                }
            }
        }
    }

    /// The proxy's view of the original-destination map.
    pub fn orig_dst_lookup(&self) -> Arc<dyn OrigDstLookup> {
        Arc::new(MapLookup { map: self.client_orig.clone() })
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// Loads a program into the kernel without attaching it.
fn load_only(prog: &mut Program, name: &'static str) -> Result<(), EbpfError> {
    let err = |source| EbpfError::Program { name, source };
    match prog {
        Program::CgroupSockAddr(p) => p.load().map_err(err),
        Program::SockOps(p) => p.load().map_err(err),
        Program::SkLookup(p) => p.load().map_err(err),
        _ => Err(EbpfError::Missing { kind: "program of a known type", name }),
    }
}

fn program_fd<'a>(prog: &'a Program, name: &'static str) -> Result<BorrowedFd<'a>, EbpfError> {
    prog.fd().map(|fd| fd.as_fd()).map_err(|source| EbpfError::Program { name, source })
}

fn program_info_id(prog: &Program, name: &'static str) -> Result<u32, EbpfError> {
    let err = |source| EbpfError::Program { name, source };
    match prog {
        Program::CgroupSockAddr(p) => Ok(p.info().map_err(err)?.id()),
        Program::SockOps(p) => Ok(p.info().map_err(err)?.id()),
        _ => Err(EbpfError::Missing { kind: "cgroup program", name }),
    }
}

/// Points the link pinned at `path` at the program `prog` (`BPF_LINK_UPDATE`): the kernel
/// swaps the program of the attached link in one step.
fn swap(path: &Path, prog: BorrowedFd<'_>) -> Result<(), EbpfError> {
    let err = |what| move |source| EbpfError::Pin { what, path: path.to_owned(), source };
    let link = bpf::obj_get(path).map_err(err("cannot open pinned link"))?;
    bpf::link_update(link.as_fd(), prog).map_err(err("cannot move the pinned link to the new program"))
}

/// The two bpf(2) commands aya keeps to itself: opening a pinned object by path, and updating
/// a link's program.
mod bpf {
    use super::*;

    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    const BPF_LINK_TYPE_NETNS: u32 = 5;

    #[repr(C)]
    #[derive(Default)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    /// The head of `struct bpf_link_info` with its `netns` member.
    #[repr(C)]
    #[derive(Default)]
    struct NetnsLinkInfo {
        kind: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        netns_ino: u32,
        attach_type: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }

    fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, initialised bpf_attr prefix of the given size for `cmd`; the
        // kernel reads (and may write) only those bytes, zero-extending the rest.
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, cmd, attr as *mut T as *mut libc::c_void, std::mem::size_of::<T>())
        };
        if ret < 0 { Err(std::io::Error::last_os_error()) } else { Ok(ret) }
    }

    pub(super) fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt as _;
        let path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mut attr = ObjAttr { pathname: path.as_ptr() as u64, ..Default::default() };
        let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// The inode of the network namespace a netns link is attached to; 0 once the namespace is
    /// gone.
    pub(super) fn link_netns_ino(link: BorrowedFd<'_>) -> std::io::Result<u32> {
        let mut info = NetnsLinkInfo::default();
        let mut attr = InfoAttr {
            bpf_fd: link.as_raw_fd() as u32,
            info_len: std::mem::size_of::<NetnsLinkInfo>() as u32,
            info: &raw mut info as u64,
        };
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        if info.kind != BPF_LINK_TYPE_NETNS {
            return Err(std::io::Error::other(format!("link {} is not a network namespace link", info.id)));
        }
        Ok(info.netns_ino)
    }

    pub(super) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
        let mut attr = LinkUpdateAttr {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: prog.as_raw_fd() as u32,
            ..Default::default()
        };
        sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
    }
}

struct MapLookup {
    map: Arc<Mutex<HashMap<MapData, ClientKey, OrigDst>>>,
}

impl OrigDstLookup for MapLookup {
    fn take(&self, client: SocketAddrV4) -> Result<Option<SocketAddrV4>, LookupError> {
        let key = ClientKey { addr: u32::from(*client.ip()).to_be(), port: client.port().to_be(), _pad: 0 };
        let mut map = self.map.lock().expect("client map lock");
        let orig = match map.get(&key, 0) {
            Ok(orig) => orig,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(err) => {
                return Err(LookupError { client, reason: err.to_string() });
            }
        };
        // A failed delete only leaves the entry to the LRU; the lookup itself succeeded.
        if let Err(err) = map.remove(&key) {
            tracing::debug!(%client, error = %err, "cannot delete original destination entry");
        }
        Ok(Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(orig.addr)), u16::from_be(orig.port))))
    }
}

/// Forwards aya-log records from the kernel programs into `tracing`, under the target
/// `gammaray::kernel`, so the node's logs carry them.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "gammaray::kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "gammaray::kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "gammaray::kernel", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "gammaray::kernel", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "gammaray::kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Drives the kernel log reader until the task is dropped.
pub async fn forward_kernel_logs(logger: aya_log::EbpfLogger<KernelLog>) -> std::io::Result<()> {
    // SAFETY: the logger owns its ring buffer's fd for its whole life, and the AsyncFd owns the
    // logger, so the fd stays open and unchanged while registered.
    let mut fd =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
