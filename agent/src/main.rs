use clap::Parser as _;
use gammaray_agent::{
    cli::{CaCommand, Cli, Command, DescribeCommand},
    control, kube_client, logging,
    run::{KubeSettings, RunConfig, SignerChoice, run, shutdown_signal},
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
                signer,
                signer_token,
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
                });
                let signer = match signer.as_deref() {
                    Some("none") => None,
                    Some("kubernetes") => Some(SignerChoice::Kube),
                    Some(other) => match other.strip_prefix("unix:") {
                        Some(path) => Some(SignerChoice::Local(path.into())),
                        None => anyhow::bail!("--signer {other:?}: give kubernetes, unix:PATH or none"),
                    },
                    None if kube_settings.is_some() => Some(SignerChoice::Kube),
                    None => None,
                };
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
                    signer,
                    signer_token,
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
            Command::Ca {
                command: CaCommand::Serve { at, socket, tokens, agent_service_account, node_ca_lifetime },
            } => {
                let lifetime = std::time::Duration::from_secs(node_ca_lifetime.max(2));
                gammaray_agent::signer::serve(
                    &at,
                    socket,
                    tokens,
                    agent_service_account,
                    lifetime,
                    shutdown_signal(),
                )
                .await
            }
            Command::Ca { command: CaCommand::Rotate { step, at } } => {
                println!("{}", gammaray_agent::signer::rotate_at(&at, step).await?);
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
