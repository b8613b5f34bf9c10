//! A real Kubernetes control plane for the tests: etcd and kube-apiserver from the envtest assets
//! (`KUBEBUILDER_ASSETS`), on loopback ports, with a data directory of their own, certificates
//! made here, a service-account signing key, RBAC authorization, an admin kubeconfig and the
//! Gateway API CRDs installed.
//!
//! There is no kubelet, scheduler or controller-manager: objects stay as written. Pods and Nodes
//! get their `status` through the status subresource ([`ControlPlane::apply_yaml`] does both).
//! Both processes stop and the directory is removed when the [`ControlPlane`] is dropped (a panic
//! unwinds through it). A reaper process does the same when this process ends without dropping
//! it (the instance [`shared`] returns, which is static, or a killed run): it waits for a pipe
//! from this process to close. Should even the reaper be killed, [`sweep`] removes what is left:
//! the directory's name carries its creator's pid.
//!
//! Without the assets a test calls [`require_apiserver`]: with `GAMMARAY_REQUIRE_APISERVER=1` (CI)
//! it fails naming `KUBEBUILDER_ASSETS`; otherwise it prints a loud SKIP.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use serde_json::Value;

use crate::names;

/// Where `scripts/setup.sh` unpacks kube-apiserver and etcd.
pub const SETUP_ASSETS: &str = "/var/cache/gammaray/envtest/current";

/// Where the binaries and the CRDs are.
#[derive(Debug, Clone)]
pub struct Assets {
    /// `kube-apiserver` and `etcd`.
    pub bin: PathBuf,
    /// The Gateway API CRDs to install (a directory of YAML files).
    pub crds: PathBuf,
}

impl Assets {
    /// `KUBEBUILDER_ASSETS` for the binaries (else where `scripts/setup.sh` unpacks them,
    /// [`SETUP_ASSETS`]); `GAMMARAY_GATEWAY_API_CRDS` for the CRDs, or the experimental channel of
    /// the shared envtest directory above the workspace.
    pub fn find() -> Result<Self, String> {
        let bin = std::env::var_os("KUBEBUILDER_ASSETS")
            .map(PathBuf::from)
            .or_else(|| Path::new(SETUP_ASSETS).is_dir().then(|| PathBuf::from(SETUP_ASSETS)))
            .ok_or(
                "KUBEBUILDER_ASSETS is not set: it names a directory holding kube-apiserver and etcd \
                 (scripts/setup.sh unpacks them from ../shared/envtest; elsewhere, controller-runtime's \
                 `setup-envtest use -p path` prints one)",
            )?;
        for tool in ["kube-apiserver", "etcd"] {
            if !bin.join(tool).is_file() {
                return Err(format!("KUBEBUILDER_ASSETS={} holds no {tool}", bin.display()));
            }
        }
        let crds = match std::env::var_os("GAMMARAY_GATEWAY_API_CRDS") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .map(|a| a.join("shared/envtest/crds/experimental"))
                .find(|d| d.is_dir())
                .ok_or("no Gateway API CRDs: set GAMMARAY_GATEWAY_API_CRDS to a directory of them")?,
        };
        Ok(Self { bin, crds })
    }
}

/// The assets, or `None` after a loud SKIP line; with `GAMMARAY_REQUIRE_APISERVER=1` a missing
/// asset fails the test instead.
pub fn require_apiserver(test: &str) -> Option<Assets> {
    match Assets::find() {
        Ok(assets) => Some(assets),
        Err(why) if std::env::var("GAMMARAY_REQUIRE_APISERVER").as_deref() == Ok("1") => {
            panic!("{test}: needs a real API server and GAMMARAY_REQUIRE_APISERVER=1: {why}")
        }
        Err(why) => {
            eprintln!("\n*** SKIP {test}: no real API server: {why} ***\n");
            None
        }
    }
}

/// The one control plane of this test binary, started on first use; `None` (after a SKIP line)
/// without the assets. Tests sharing it keep to namespaces, Service addresses and Lease names of
/// their own. Statics are never dropped: its reaper stops it when the process exits.
pub fn shared(test: &str) -> Option<&'static ControlPlane> {
    static SHARED: OnceLock<ControlPlane> = OnceLock::new();
    let assets = require_apiserver(test)?;
    Some(SHARED.get_or_init(|| ControlPlane::start(&assets).expect("start the shared control plane")))
}

/// What the reaper runs (`$0` is the directory): it waits for its stdin to close, which happens
/// when the control plane is dropped or its process ends however it ends, then stops what the
/// directory's `pids` lists (only etcd and kube-apiserver, so a pid reused since is left alone)
/// and removes the directory.
const REAPER: &str = r#"cat >/dev/null
ours() { case "$(readlink "/proc/$1/exe" 2>/dev/null)" in */etcd|*/kube-apiserver) return 0;; esac; return 1; }
pids="$(cat "$0/pids" 2>/dev/null)"
for p in $pids; do ours "$p" && kill -KILL "$p"; done
for _ in $(seq 50); do
  left=""; for p in $pids; do ours "$p" && left="$left $p"; done
  [ -z "$left" ] && break; sleep 0.1
done
rm -rf "$0""#;

/// What stops a control plane: its pids and its directory.
struct Cleanup {
    pids: Vec<u32>,
    dir: PathBuf,
}

impl Cleanup {
    fn run(&self) {
        for &pid in &self.pids {
            stop_pid(pid);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Ends `pid` at once (SIGKILL: a test's control plane has nothing to save, and etcd keeps what
/// it acknowledged), and reaps it if it is our child; otherwise waits up to 5 s for it to go.
fn stop_pid(pid: u32) {
    use nix::{
        sys::{
            signal::{Signal, kill},
            wait::waitpid,
        },
        unistd::Pid,
    };
    let pid = Pid::from_raw(pid as i32);
    if kill(pid, Signal::SIGKILL).is_err() {
        return;
    }
    if waitpid(pid, None).is_ok() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a control plane runs: on this host's loopback (tests), or inside a node of a simulated
/// cluster on that node's address, where the agents in the cluster's nodes reach it (the
/// conformance runner and the demo).
#[derive(Debug, Clone)]
pub struct Site {
    /// The network namespace to run in (and to run kubectl in); `None`: this one.
    pub netns: Option<PathBuf>,
    /// The API server's address.
    pub address: Ipv4Addr,
}

impl Site {
    pub fn loopback() -> Self {
        Self { netns: None, address: Ipv4Addr::LOCALHOST }
    }
}

/// A running etcd and kube-apiserver.
pub struct ControlPlane {
    dir: PathBuf,
    site: Site,
    bin: PathBuf,
    url: String,
    etcd_url: String,
    kubeconfig: PathBuf,
    etcd: Mutex<Option<Child>>,
    apiserver: Mutex<Option<Child>>,
    apiserver_args: Vec<String>,
    /// Stops both processes and removes the directory once its stdin closes: at drop, or when
    /// this process ends without dropping (a static, a kill).
    reaper: Mutex<Option<Child>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").field("url", &self.url).field("dir", &self.dir).finish()
    }
}

/// A free port on loopback (free when asked; the processes bind it a moment later).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ControlPlane {
    /// Starts etcd and kube-apiserver on loopback, waits until the API server is ready, and
    /// installs the CRDs; a few seconds.
    pub fn start(assets: &Assets) -> Result<Self, BoxError> {
        Self::start_at(assets, Site::loopback())
    }

    /// [`ControlPlane::start`] at `site`.
    pub fn start_at(assets: &Assets, site: Site) -> Result<Self, BoxError> {
        let started = Instant::now();
        sweep();
        let dir = std::env::temp_dir().join(format!("{}-apiserver", names::unique_run()));
        std::fs::create_dir_all(dir.join("etcd"))?;
        // A node's namespace is the control plane's alone: the usual ports are free there.
        let (etcd_port, peer_port, port) = match site.netns {
            Some(_) => (2379, 2380, 6443),
            None => (free_port()?, free_port()?, free_port()?),
        };
        write_certificates(&dir, site.address)?;
        let url = format!("https://{}:{port}", site.address);
        std::fs::write(dir.join("kubeconfig"), kubeconfig(&dir, &url))?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let etcd_args: Vec<String> = [
            "--data-dir",
            &dir.join("etcd").display().to_string(),
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("default={peer}"),
            "--log-level",
            "warn",
        ]
        .map(String::from)
        .to_vec();
        let d = |f: &str| dir.join(f).display().to_string();
        let audience = "https://kubernetes.default.svc.cluster.local";
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={}", site.address),
            format!("--advertise-address={}", site.address),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d("certs")),
            format!("--tls-cert-file={}", d("serving.crt")),
            format!("--tls-private-key-file={}", d("serving.key")),
            format!("--client-ca-file={}", d("ca.crt")),
            format!("--service-account-issuer={audience}"),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            format!("--api-audiences={audience}"),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--endpoint-reconciler-type=none".into(),
            // No controller-manager creates the namespaces' `default` ServiceAccounts, so Pods
            // are admitted as written (no token volume is added either).
            "--disable-admission-plugins=ServiceAccount".into(),
            "--v=0".into(),
        ];
        let reaper = Command::new("sh")
            .arg("-c")
            .arg(REAPER)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("the control plane's reaper: {e}"))?;
        let mut plane = Self {
            reaper: Mutex::new(Some(reaper)),
            site,
            bin: assets.bin.clone(),
            url,
            etcd_url,
            kubeconfig: dir.join("kubeconfig"),
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
            apiserver_args,
            dir,
        };
        *plane.etcd.get_mut().expect("lock") = Some(plane.spawn("etcd", &etcd_args)?);
        plane.start_apiserver()?;
        // A release's CRD directory is a kustomization; a plain directory of YAML works too.
        let crds = assets.crds.display().to_string();
        let how = if assets.crds.join("kustomization.yaml").is_file() { "-k" } else { "-f" };
        plane.kubectl_ok(&["apply", "--server-side", how, &crds])?;
        // The kinds the agent defines itself (AuthorizationPolicy), as deploy/crds/ holds them.
        let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        plane.kubectl_ok(&["apply", "--server-side", "-f", &own.display().to_string()])?;
        plane.kubectl_ok(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"])?;
        eprintln!("testkit: kube-apiserver at {} ready in {:?}", plane.url, started.elapsed());
        Ok(plane)
    }

    /// `program` as a command run at the site (nsenter execs it: the pid is the program's).
    fn command(&self, program: &Path) -> Command {
        match &self.site.netns {
            Some(netns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", netns.display())).arg("--").arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn spawn(&self, tool: &str, args: &[String]) -> Result<Child, BoxError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{tool}.log")))?;
        let child = self
            .command(&self.bin.join(tool))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.bin.join(tool).display()))?;
        self.record_pids(Some(child.id()));
        Ok(child)
    }

    /// The pids in the directory, for [`sweep`].
    fn record_pids(&self, add: Option<u32>) {
        let path = self.dir.join("pids");
        let mut pids: Vec<u32> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        pids.extend(add);
        let _ = std::fs::write(&path, pids.iter().map(|p| format!("{p}\n")).collect::<String>());
    }

    /// Starts kube-apiserver (again) and waits until it is ready.
    pub fn start_apiserver(&self) -> Result<(), BoxError> {
        let child = self.spawn("kube-apiserver", &self.apiserver_args)?;
        *self.apiserver.lock().expect("lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.kubectl(&["get", "--raw=/readyz"]).is_ok_and(|out| out.trim() == "ok") {
                return Ok(());
            }
            if let Some(status) =
                self.apiserver.lock().expect("lock").as_mut().and_then(|c| c.try_wait().ok().flatten())
            {
                // The directory goes with the failed start: the log's end says why.
                let log = std::fs::read_to_string(self.dir.join("kube-apiserver.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!("kube-apiserver exited ({status}):\n{}", tail.join("\n")).into());
            }
            if Instant::now() > deadline {
                return Err("kube-apiserver was not ready in 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops kube-apiserver, leaving etcd and its data.
    pub fn stop_apiserver(&self) {
        if let Some(child) = self.apiserver.lock().expect("lock").take() {
            stop_pid(child.id());
        }
    }

    /// The running processes' pids (kube-apiserver's, then etcd's).
    pub fn pids(&self) -> Vec<u32> {
        self.cleanup().pids
    }

    /// The data directory (etcd's data, certificates, kubeconfig, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An admin kubeconfig (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA certificate that signed the API server's serving certificate (PEM).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.crt")).unwrap_or_default()
    }

    /// Runs kubectl as admin; its stdout, or its stderr as the error.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_with_input(args, None)
    }

    fn kubectl_ok(&self, args: &[&str]) -> Result<String, BoxError> {
        self.kubectl(args).map_err(|e| format!("kubectl {}: {e}", args.join(" ")).into())
    }

    /// Runs kubectl as admin with `input` on its stdin.
    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String, String> {
        let mut child = self
            .command(Path::new("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("kubectl: {e}"))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).map_err(|e| format!("kubectl's stdin: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("kubectl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            // kubectl's answer to a question (`auth can-i`: "no") comes on stdout with a failure.
            let said = [&out.stdout[..], &out.stderr[..]].concat();
            Err(String::from_utf8_lossy(&said).trim().to_owned())
        }
    }

    /// Applies every object of a multi-document YAML text (server-side apply, as admin), then the
    /// `status` of those that carry one through their status subresource (a Pod's or a Node's, a
    /// route's entries of other controllers). Panics with the server's message if it refuses one.
    pub fn apply_yaml(&self, text: &str) {
        self.try_apply_yaml(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }

    /// [`ControlPlane::apply_yaml`], with the server's refusal as the error.
    pub fn try_apply_yaml(&self, text: &str) -> Result<(), String> {
        let apply = ["apply", "--server-side", "--force-conflicts", "--field-manager=testkit", "-f", "-"];
        self.kubectl_with_input(&apply, Some(text)).map_err(|e| format!("apply: {e}"))?;
        let with_status: Vec<String> = serde_yaml::Deserializer::from_str(text)
            .filter_map(|doc| Value::deserialize(doc).ok())
            .filter(|v| v.get("status").is_some_and(|s| !s.is_null()))
            .filter_map(|v| serde_yaml::to_string(&v).ok())
            .collect();
        if !with_status.is_empty() {
            let status = with_status.join("---\n");
            let args = [&apply[..4], &["--subresource=status", "-f", "-"]].concat();
            self.kubectl_with_input(&args, Some(&status)).map_err(|e| format!("apply status: {e}"))?;
        }
        Ok(())
    }

    /// Creates `object` (JSON) and returns it as the server stored it (with its UID).
    pub fn create(&self, object: &Value) -> Result<Value, String> {
        let out = self.kubectl_with_input(&["create", "-f", "-", "-o", "json"], Some(&object.to_string()))?;
        serde_json::from_str(&out).map_err(|e| format!("kubectl create's output: {e}"))
    }

    /// Deletes every object of a multi-document YAML text that exists.
    pub fn delete_yaml(&self, text: &str) -> Result<(), String> {
        self.kubectl_with_input(&["delete", "--ignore-not-found", "--wait=false", "-f", "-"], Some(text))
            .map(|_| ())
    }

    /// The object, if it exists.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource(api_version, kind);
        let mut args = vec!["get", resource.as_str(), name, "-o", "json"];
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        serde_json::from_str(&self.kubectl(&args).ok()?).ok()
    }

    /// Deletes the object; whether it existed.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let resource = resource(api_version, kind);
        let mut args = vec!["delete", resource.as_str(), name, "--wait=false"];
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        self.kubectl(&args).is_ok()
    }

    /// A token for the ServiceAccount `namespace/name` (TokenRequest), valid for an hour.
    pub fn token(&self, namespace: &str, name: &str) -> Result<String, String> {
        Ok(self.kubectl(&["create", "token", name, "-n", namespace, "--duration=1h"])?.trim().to_owned())
    }

    /// A kubeconfig at `path` that authenticates with `token` instead of the admin certificate.
    pub fn write_token_kubeconfig(&self, path: &Path, token: &str) -> std::io::Result<()> {
        let ca = self.dir.join("ca.crt");
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: '{}', certificate-authority: '{}'}}\nusers:\n- name: token\n  user: {{token: '{token}'}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: token}}\ncurrent-context: test\n",
                self.url,
                ca.display()
            ),
        )
    }

    /// Compacts etcd's history up to now, so a watch resuming from an older resourceVersion gets
    /// 410 Gone.
    pub fn compact(&self) -> Result<(), String> {
        if self.site.netns.is_some() {
            return Err("compaction is for a control plane on this host's loopback".into());
        }
        let range = etcd_post(&self.etcd_url, "/v3/kv/range", r#"{"key":"AA==","limit":1}"#)?;
        let revision = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse::<i64>().ok())
            .ok_or(format!("no revision in {range}"))?;
        etcd_post(
            &self.etcd_url,
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )?;
        Ok(())
    }

    fn cleanup(&self) -> Cleanup {
        let pids = [&self.apiserver, &self.etcd]
            .iter()
            .filter_map(|c| c.lock().ok()?.as_ref().map(Child::id))
            .collect();
        Cleanup { pids, dir: self.dir.clone() }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.cleanup().run();
        if let Some(mut reaper) = self.reaper.lock().ok().and_then(|mut r| r.take()) {
            drop(reaper.stdin.take());
            let _ = reaper.wait();
        }
    }
}

use serde::Deserialize as _;

/// How kubectl names the resource of `kind`: `kind.version.group`, unambiguous, for a named group;
/// the kind alone for the core group's.
fn resource(api_version: &str, kind: &str) -> String {
    match api_version.split_once('/') {
        Some((group, version)) => format!("{kind}.{version}.{group}"),
        None => kind.to_owned(),
    }
}

/// A POST of `body` to etcd's JSON gateway; the answer.
fn etcd_post(base: &str, path: &str, body: &str) -> Result<Value, String> {
    let addr: SocketAddr =
        base.trim_start_matches("http://").parse().map_err(|e| format!("etcd address {base}: {e}"))?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).map_err(|e| e.to_string())?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP answer from etcd")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("etcd {path}: {head}: {body}"));
    }
    // The gateway may answer chunked: the JSON object is what lies between the outer braces.
    let json = &body[body.find('{').unwrap_or(0)..=body.rfind('}').unwrap_or(body.len().saturating_sub(1))];
    serde_json::from_str(json).map_err(|e| format!("etcd {path}: {e}: {body}"))
}

/// The CA, the API server's serving certificate, the admin's client certificate and the
/// service-account signing key, as PEM files in `dir`.
fn write_certificates(dir: &Path, address: Ipv4Addr) -> Result<(), rcgen::Error> {
    let write = |name: &str, pem: String| {
        std::fs::write(dir.join(name), pem).map_err(|e| rcgen::Error::PemError(format!("{name}: {e}")))
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "testkit control plane CA");
    write("ca.crt", ca.clone().self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut names = vec![address.to_string(), "127.0.0.1".to_owned()];
    names.dedup();
    names.extend(["localhost".to_owned(), "kubernetes.default.svc".to_owned()]);
    let mut serving = CertificateParams::new(names)?;
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    write("serving.crt", serving.signed_by(&key, &issuer)?.pem())?;
    write("serving.key", key.serialize_pem())?;

    let key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, "testkit-admin");
    admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    write("admin.crt", admin.signed_by(&key, &issuer)?.pem())?;
    write("admin.key", key.serialize_pem())?;

    // The API server signs service-account tokens with the key and checks them with its public
    // half, which it reads from a file of its own.
    let sa = KeyPair::generate()?;
    write("sa.pub", sa.public_key_pem())?;
    write("sa.key", sa.serialize_pem())
}

fn kubeconfig(dir: &Path, url: &str) -> String {
    let d = |f: &str| dir.join(f).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: '{url}', certificate-authority: '{}'}}\nusers:\n- name: admin\n  user: {{client-certificate: '{}', client-key: '{}'}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin}}\ncurrent-context: test\n",
        d("ca.crt"),
        d("admin.crt"),
        d("admin.key")
    )
}

/// Stops the processes and removes the directories of control planes whose creating process is
/// gone; returns how many it removed.
pub fn sweep() -> usize {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return 0 };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name.strip_suffix("-apiserver").and_then(names::owner_pid) else { continue };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        for pid in std::fs::read_to_string(entry.path().join("pids")).unwrap_or_default().lines() {
            let Ok(pid) = pid.parse::<u32>() else { continue };
            // Only what we started: a pid reused since by another program is left alone.
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if exe.file_name().is_some_and(|n| n == "etcd" || n == "kube-apiserver") {
                stop_pid(pid);
            }
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Control-plane directories (and so possibly processes) that exist now, of any owner.
pub fn leftovers() -> Vec<PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(names::PREFIX) && name.ends_with("-apiserver")
        })
        .map(|e| e.path())
        .collect()
}
