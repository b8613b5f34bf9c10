use clap::Parser as _;
use gammaray_agent::{
    cli::{CaCommand, Cli, Command, DescribeCommand},
    control, kube_client, logging,
    run::{KubeSettings, RunConfig, run, shutdown_signal},
    status_writer,
};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_json);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(logging::flush_on_park)
        .build()?;
    let result = rt.block_on(async move {
        let client = control::Client::new(&cli.control);
        match cli.command {
            Command::Run {
                node,
                proxy_addr,
                hbone_port,
                cgroup_root,
                btf,
                proxy_threads,
                manifests,
                trust_domain,
                ca_cert,
                ca_key,
                admin_addr,
                metrics_addr,
                kube,
                proc_root,
                drain_timeout,
                bpffs,
                failure_mode,
            } => {
                let kube_settings = kube_client::Access::detect(kube.kubeconfig).map(|access| KubeSettings {
                    access,
                    lease: status_writer::LeaseConfig {
                        namespace: kube.namespace.clone(),
                        name: kube.lease_name,
                        identity: node.clone(),
                        duration: std::time::Duration::from_secs(kube.lease_duration_secs.max(1)),
                    },
                    ca_secret: (!kube.ca_secret.is_empty()).then_some((kube.namespace, kube.ca_secret)),
                });
                let cfg = RunConfig {
                    node,
                    proxy: gammaray_proxy::ProxyConfig {
                        outbound_addr: proxy_addr.into(),
                        hbone_port,
                        trust_domain,
                        ..Default::default()
                    },
                    cgroup_root,
                    control_socket: cli.control,
                    btf_path: btf,
                    proxy_threads,
                    manifests,
                    ca: ca_cert.zip(ca_key),
                    admin_addr,
                    metrics_addr,
                    kube: kube_settings,
                    proc_root,
                    drain_timeout: std::time::Duration::from_secs(drain_timeout),
                    bpffs,
                    failure_mode,
                };
                run(cfg, shutdown_signal()).await
            }
            Command::Uninstall { bpffs } => {
                let removed = gammaray_agent::ebpf::uninstall(&gammaray_agent::ebpf::Pins::new(&bpffs))?;
                println!(
                    "removed {} link(s) and {} map(s) pinned at {}",
                    removed.links,
                    removed.maps,
                    bpffs.display()
                );
                Ok(())
            }
            Command::Crds => {
                print!("{}", gammaray_agent::authz::crds_yaml()?);
                Ok(())
            }
            Command::Enrol { netns } => {
                let r = client.enrol(&netns).await?;
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }
            Command::Unenrol { netns } => {
                let r = client.unenrol(&netns).await?;
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }
            Command::Ca { command: CaCommand::Generate { out, trust_domain } } => {
                let ca = gammaray_proxy::identity::Authority::generate(&trust_domain)?;
                std::fs::create_dir_all(&out)?;
                std::fs::write(out.join("ca.crt"), ca.cert_pem())?;
                let key = out.join("ca.key");
                std::fs::write(&key, ca.key_pem())?;
                std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                println!("wrote {} and {}", out.join("ca.crt").display(), key.display());
                Ok(())
            }
            Command::Ca { command: CaCommand::Bootstrap { kubeconfig, namespace, name, trust_domain } } => {
                let access = kube_client::Access::detect(kubeconfig)
                    .ok_or_else(|| anyhow::anyhow!("no cluster: give --kubeconfig or run in a pod"))?;
                let client = kube_client::client(&access).await?;
                if kube_client::bootstrap_ca(&client, &namespace, &name, &trust_domain).await? {
                    println!("created the mesh CA Secret {namespace}/{name}");
                } else {
                    println!("the mesh CA Secret {namespace}/{name} already exists; left as it is");
                }
                Ok(())
            }
            Command::Describe { what: DescribeCommand::Service { name, namespace } } => {
                print!("{}", client.describe(&namespace, &name).await?);
                Ok(())
            }
            Command::Describe { what: DescribeCommand::Workload { name, namespace, from, port } } => {
                print!("{}", client.describe_workload(&namespace, &name, from.as_deref(), port).await?);
                Ok(())
            }
            Command::ConfigDump => {
                println!("{}", client.config_dump().await?);
                Ok(())
            }
            Command::Status => {
                println!("{}", serde_json::to_string_pretty(&client.status().await?)?);
                Ok(())
            }
        }
    });
    logging::flush_thread();
    result
}
