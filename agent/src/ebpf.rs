//! Loading, attaching and driving the eBPF programs: the only place the agent touches the
//! kernel's maps. Detaching happens on drop: the links are file descriptors owned here.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};
use gammaray_common::{
    CONFIG_FLAG_ACTIVE, COUNTER_ERRORS, COUNTER_LOOKUP_MISSES, COUNTER_REDIRECTED, COUNTER_SKIPPED,
    ClientKey, Config, Enrolled, MAP_CLIENT_ORIG, MAP_CONFIG, MAP_COUNTERS, MAP_ENROLLED, OrigDst,
    PROG_CONNECT4, PROG_SOCKOPS,
};
use gammaray_proxy::orig_dst::{LookupError, OrigDstLookup};

/// Links made with bpf_link_create are always multi-attach in the kernel, which rejects the
/// ALLOW_MULTI flag on them (EINVAL): `Single` passes no flag, and other agents or tools
/// attached at the same cgroup keep running beside ours.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The eBPF object built by build.rs from the `ebpf/` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gammaray"));

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
}

/// Kernel counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelCounters {
    pub redirected: u64,
    pub skipped: u64,
    pub lookup_misses: u64,
    pub errors: u64,
}

/// Identifiers of what the agent put into the kernel, so callers can check it is gone later.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    pub cgroup: PathBuf,
    pub link_ids: Vec<u32>,
    pub program_ids: Vec<u32>,
}

/// The loaded and attached programs with handles on their maps.
pub struct Datapath {
    // Dropping `links` detaches the programs; `ebpf` keeps the programs and maps alive.
    links: Vec<FdLink>,
    attachment: Attachment,
    enrolled: Mutex<HashMap<MapData, u64, Enrolled>>,
    counters: PerCpuArray<MapData, u64>,
    client_orig: Arc<Mutex<HashMap<MapData, ClientKey, OrigDst>>>,
    logger: Option<aya_log::EbpfLogger<KernelLog>>,
    _ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object, points it at the node proxy's outbound listener and attaches both
    /// programs to `cgroup_root` as links beside any other programs there.
    pub fn load(cgroup_root: &Path, proxy: SocketAddrV4) -> Result<Self, EbpfError> {
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(EbpfError::Load)?;
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog).map_err(EbpfError::Log)?;

        let mut config: Array<MapData, Config> = take_map(&mut ebpf, MAP_CONFIG)?;
        let cfg = Config {
            proxy_addr: u32::from(*proxy.ip()).to_be(),
            proxy_port: proxy.port().to_be(),
            flags: CONFIG_FLAG_ACTIVE,
            ..Config::default()
        };
        config.set(0, &cfg, 0).map_err(|source| EbpfError::Map { name: MAP_CONFIG, source })?;
        let enrolled = take_map(&mut ebpf, MAP_ENROLLED)?;
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        let client_orig = take_map(&mut ebpf, MAP_CLIENT_ORIG)?;

        let cgroup = File::open(cgroup_root)
            .map_err(|source| EbpfError::Cgroup { path: cgroup_root.to_owned(), source })?;
        let mut links = Vec::new();
        let mut program_ids = Vec::new();

        let prog: &mut CgroupSockAddr = program(&mut ebpf, PROG_CONNECT4)?;
        let err = |source| EbpfError::Program { name: PROG_CONNECT4, source };
        prog.load().map_err(err)?;
        let id = prog.attach(&cgroup, ATTACH_MODE).map_err(err)?;
        links.push(FdLink::try_from(prog.take_link(id).map_err(err)?).map_err(EbpfError::Link)?);
        program_ids.push(prog.info().map_err(err)?.id());

        let prog: &mut SockOps = program(&mut ebpf, PROG_SOCKOPS)?;
        let err = |source| EbpfError::Program { name: PROG_SOCKOPS, source };
        prog.load().map_err(err)?;
        let id = prog.attach(&cgroup, ATTACH_MODE).map_err(err)?;
        links.push(FdLink::try_from(prog.take_link(id).map_err(err)?).map_err(EbpfError::Link)?);
        program_ids.push(prog.info().map_err(err)?.id());

        let link_ids = links
            .iter()
            .map(|l| l.info().map(|i| i.id()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(EbpfError::Link)?;
        tracing::info!(
            cgroup = %cgroup_root.display(), %proxy, ?link_ids, ?program_ids,
            "eBPF programs attached"
        );
        Ok(Self {
            links,
            attachment: Attachment { cgroup: cgroup_root.to_owned(), link_ids, program_ids },
            enrolled: Mutex::new(enrolled),
            counters,
            client_orig: Arc::new(Mutex::new(client_orig)),
            logger: Some(logger),
            _ebpf: ebpf,
        })
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
        })
    }

    /// The proxy's view of the original-destination map.
    pub fn orig_dst_lookup(&self) -> Arc<dyn OrigDstLookup> {
        Arc::new(MapLookup { map: self.client_orig.clone() })
    }

    /// Detaches both programs now (dropping the datapath does the same).
    pub fn detach(&mut self) {
        let n = self.links.len();
        self.links.clear();
        tracing::info!(links = n, "eBPF programs detached");
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing { kind: "program", name })?;
    prog.try_into().map_err(|source| EbpfError::Program { name, source })
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
