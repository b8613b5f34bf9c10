//! The simulated cluster: nodes are network namespaces on a shared bridge, pods are network
//! namespaces joined to their node by a veth pair, routed like a simple CNI does it.
//!
//! ```text
//!   fabric netns: bridge br0 ── gr<i> ══ eth0 (10.200.0.<i>/24) node <i> netns
//!   node <i> netns: grp<k> (10.244.<i>.1/32, gateway) ══ eth0 (10.244.<i>.<k+2>/32) pod netns
//!   node <i> routes 10.244.<j>.0/24 via 10.200.0.<j> for every other node j
//! ```
//!
//! Each pod also gets a cgroup laid out as the kubelet's cgroupfs driver lays it out:
//! `<run>/<node>/kubepods/besteffort/pod<uid>/<container id>`, with a first process in it (as
//! the pause container is), so an agent finds the pod's network namespace from its UID.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::{
    Result,
    cgroup::{Cgroup, cgroup2_root},
    names,
    netns::{Netns, ip},
    process::{Placement, Process},
};

/// The address of node `index` (1-based) on the fabric.
pub fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, index)
}

/// The gateway address every pod on node `index` routes through.
pub fn pod_gateway(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index, 1)
}

pub struct Cluster {
    run: String,
    nodes: Vec<Node>,
    pods: Mutex<Vec<Arc<Pod>>>,
    dir: PathBuf,
    // Dropped last, in this order: the cgroup tree (kills every process of the run), then the
    // fabric namespace.
    cgroup: Cgroup,
    _fabric: Netns,
    /// Unmounted after the processes are gone: every pin of the run's agents goes with it.
    _bpffs: crate::bpffs::Bpffs,
}

pub struct Node {
    pub name: String,
    pub index: u8,
    pub ip: Ipv4Addr,
    /// Where the node's agents pin their eBPF maps and links (`--bpffs`).
    pub bpffs: PathBuf,
    netns: Netns,
    system_cgroup: PathBuf,
    next_pod: Mutex<u8>,
}

pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// The node-side end of the pod's veth.
    pub host_veth: String,
    netns: Netns,
    cgroup: PathBuf,
    /// The pod's first process, as a pause container is: it holds the pod's cgroup and network
    /// namespace, which is how an agent finds the namespace from the pod's UID.
    _pause: Process,
}

impl Cluster {
    /// Builds `nodes` nodes (at most 250), first sweeping what crashed runs left behind.
    pub fn new(nodes: u8) -> Result<Self> {
        crate::sweep::sweep();
        let run = names::unique_run();
        let fabric = Netns::create(&format!("{run}-fabric"))?;
        let cgroup = Cgroup::create(cgroup2_root()?.join(&run))?;
        let bpffs = crate::bpffs::Bpffs::mount(&run)?;
        let dir = std::env::temp_dir().join(&run);
        std::fs::create_dir_all(&dir).map_err(|source| crate::Error::Io { path: dir.clone(), source })?;
        ip(&["-n", fabric.name(), "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", fabric.name(), "link", "set", "br0", "up"])?;
        let mut built = Vec::new();
        for index in 1..=nodes {
            let name = format!("node{index}");
            let netns = Netns::create(&format!("{run}-{name}"))?;
            let fab_if = format!("{}{index}", names::VETH_PREFIX);
            veth(fabric.name(), &fab_if, netns.name())?;
            ip(&["-n", fabric.name(), "link", "set", &fab_if, "master", "br0", "up"])?;
            let node_ip = node_ip(index);
            ip(&["-n", netns.name(), "addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
            ip(&["-n", netns.name(), "link", "set", "eth0", "up"])?;
            netns.sysctl("net.ipv4.ip_forward", "1")?;
            let node_cg = cgroup.child(&name)?;
            let system_cgroup = cgroup.child(&format!("{name}/system"))?;
            let _ = node_cg;
            let pins = bpffs.node(&name);
            built.push(Node {
                name,
                index,
                ip: node_ip,
                bpffs: pins,
                netns,
                system_cgroup,
                next_pod: Mutex::new(0),
            });
        }
        for node in &built {
            for other in built.iter().filter(|o| o.index != node.index) {
                let cidr = format!("10.244.{}.0/24", other.index);
                ip(&["-n", node.netns.name(), "route", "add", &cidr, "via", &other.ip.to_string()])?;
            }
        }
        Ok(Self {
            run,
            nodes: built,
            pods: Mutex::new(Vec::new()),
            dir,
            cgroup,
            _fabric: fabric,
            _bpffs: bpffs,
        })
    }

    /// The run's unique name (prefix of every namespace and cgroup it made).
    pub fn run_name(&self) -> &str {
        &self.run
    }

    /// A scratch directory for this run's logs and files; removed with the cluster, unless the
    /// thread is panicking, when it is kept for inspection.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index` (1-based).
    pub fn node(&self, index: u8) -> &Node {
        &self.nodes[usize::from(index) - 1]
    }

    /// Creates a pod on node `node` (1-based).
    pub fn add_pod(&self, node: u8, namespace: &str, name: &str) -> Result<Arc<Pod>> {
        self.add_pod_with_uid(node, namespace, name, None)
    }

    /// [`Cluster::add_pod`] with the UID a real API server gave the pod's object (its cgroup is
    /// named by it, which is how an agent finds the pod); `None` makes one up.
    pub fn add_pod_with_uid(
        &self,
        node: u8,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Arc<Pod>> {
        let node = self.node(node);
        let k = {
            let mut next = node.next_pod.lock().expect("pod counter lock");
            *next += 1;
            *next
        };
        if k > 250 {
            return Err(crate::Error::Other(format!("node {} is full", node.name)));
        }
        let pod_ip = Ipv4Addr::new(10, 244, node.index, k + 1);
        let netns = Netns::create(&format!("{}-{}-{namespace}-{name}", self.run, node.name))?;
        let host_veth = format!("{}p{k}", names::VETH_PREFIX);
        let n = node.netns.name();
        veth(n, &host_veth, netns.name())?;
        ip(&["-n", n, "addr", "add", &format!("{}/32", pod_gateway(node.index)), "dev", &host_veth])?;
        ip(&["-n", n, "link", "set", &host_veth, "up"])?;
        ip(&["-n", n, "route", "add", &format!("{pod_ip}/32"), "dev", &host_veth, "scope", "link"])?;
        let p = netns.name();
        ip(&["-n", p, "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
        ip(&["-n", p, "link", "set", "eth0", "up"])?;
        let gw = pod_gateway(node.index).to_string();
        ip(&["-n", p, "route", "add", &format!("{gw}/32"), "dev", "eth0", "scope", "link"])?;
        ip(&["-n", p, "route", "add", "default", "via", &gw, "dev", "eth0"])?;

        let uid = uid.map_or_else(|| pod_uid(&self.run, node.index, k), str::to_owned);
        let container = format!("{:064x}", u128::from(k) << 8 | u128::from(node.index));
        let cgroup = self.cgroup.child(&format!("{}/kubepods/besteffort/pod{uid}/{container}", node.name))?;
        let procs = cgroup.join("cgroup.procs");
        let pause = Process::spawn(
            &format!("{name}-pause"),
            Placement { netns: &netns.path(), cgroup_procs: &procs },
            Path::new("sleep"),
            &["infinity".to_owned()],
            &[],
            None,
        )?;
        let pod = Arc::new(Pod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uid,
            node: node.name.clone(),
            ip: pod_ip,
            host_veth,
            netns,
            cgroup,
            _pause: pause,
        });
        self.pods.lock().expect("pods lock").push(pod.clone());
        Ok(pod)
    }

    /// Makes `addr` an extra address of `pod`, reachable from every node: how tests stand up
    /// a fixed address (a Service-like VIP) served by one pod.
    pub fn add_pod_address(&self, pod: &Pod, addr: Ipv4Addr) -> Result<()> {
        ip(&["-n", pod.netns.name(), "addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        let home = self.nodes.iter().find(|n| n.name == pod.node).expect("pod's node exists");
        ip(&[
            "-n",
            home.netns.name(),
            "route",
            "add",
            &format!("{addr}/32"),
            "dev",
            &pod.host_veth,
            "scope",
            "link",
        ])?;
        for other in self.nodes.iter().filter(|n| n.index != home.index) {
            ip(&[
                "-n",
                other.netns.name(),
                "route",
                "add",
                &format!("{addr}/32"),
                "via",
                &home.ip.to_string(),
            ])?;
        }
        Ok(())
    }

    /// Removes a pod now (its processes are killed, its namespace deleted).
    pub fn remove_pod(&self, pod: &Arc<Pod>) {
        self.pods.lock().expect("pods lock").retain(|p| !Arc::ptr_eq(p, pod));
        let _ = crate::cgroup::remove_tree(pod.cgroup.parent().unwrap_or(&pod.cgroup));
    }
}

/// A veth pair: `host_if` in namespace `ns`, its peer `eth0` in namespace `peer_ns`.
fn veth(ns: &str, host_if: &str, peer_ns: &str) -> Result<()> {
    ip(&["-n", ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", peer_ns])
}

fn pod_uid(run: &str, node: u8, k: u8) -> String {
    let pid = names::owner_pid(run).unwrap_or(0);
    let seq: u32 = run.rsplit('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
    format!("{pid:08x}-{seq:04x}-4{node:03x}-8{k:03x}-{:012x}", u64::from(node) << 8 | u64::from(k))
}

impl Node {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Runs `f` on a thread in this node's network namespace (the host network of the node).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.netns.run(f)
    }

    /// Starts a host process on this node.
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> Result<Process> {
        let procs = self.system_cgroup.join("cgroup.procs");
        Process::spawn(
            name,
            Placement { netns: &self.netns.path(), cgroup_procs: &procs },
            program,
            args,
            env,
            log,
        )
    }
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// The pod's container cgroup.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Runs `f` on a thread in this pod's network namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.netns.run(f)
    }

    /// Starts a process in this pod: it joins the pod's cgroup, then its network namespace.
    pub fn spawn(
        &self,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> Result<Process> {
        let procs = self.cgroup.join("cgroup.procs");
        Process::spawn(
            &self.name,
            Placement { netns: &self.netns.path(), cgroup_procs: &procs },
            program,
            args,
            env,
            log,
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill every process of the run first, so no namespace is held open by a child.
        if let Err(err) = crate::cgroup::remove_tree(self.cgroup.path()) {
            eprintln!("testkit: cannot remove cgroup tree of {}: {err}", self.run);
        }
        self.pods.lock().map(|mut p| p.clear()).ok();
        if std::thread::panicking() {
            eprintln!("testkit: logs of the failed run {} kept in {}", self.run, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
