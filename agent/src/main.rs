use clap::Parser as _;
use gammaray_agent::{
    cli::{Cli, Command},
    control, logging,
    run::{RunConfig, run, shutdown_signal},
};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_json);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = control::Client::new(&cli.control);
        match cli.command {
            Command::Run {
                node,
                proxy_addr,
                cgroup_root,
                btf,
                proxy_threads,
                manifests,
                trust_domain,
            } => {
                let cfg = RunConfig {
                    node,
                    proxy_addr,
                    cgroup_root,
                    control_socket: cli.control,
                    btf_path: btf,
                    proxy_threads,
                    manifests,
                    trust_domain,
                };
                run(cfg, shutdown_signal()).await
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
            Command::Status => {
                println!("{}", serde_json::to_string_pretty(&client.status().await?)?);
                Ok(())
            }
        }
    })
}
