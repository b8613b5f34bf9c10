//! The agent as a process: a missing privilege is named, its flags and variables parse, and
//! nothing is left behind when it stops.

use std::net::SocketAddr;

use gammaray_testkit::{Cluster, agent::AgentArgs, require_privileged};

use super::support::*;

#[test]
fn a_missing_privilege_is_named() {
    if !require_privileged("missing-privilege") {
        return;
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(env!("CARGO_BIN_EXE_gammaray-agent"))
        .args(["--control", "/tmp/gammaray-never.sock", "run", "--node", "n", "--proxy-addr", "127.0.0.1:1"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run agent without privileges");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing privilege: CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"), "{stderr}");
}

/// `GAMMARAY_LOG_JSON` takes the words its documentation gives (`1` among them) and names
/// anything else as an error. Needs no privilege: `status` parses the command line, then fails
/// on a control socket that does not exist.
#[test]
fn the_log_json_variable_takes_the_usual_boolean_words() {
    let status = |value: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gammaray-agent"))
            .args(["--control", "/tmp/gammaray-never.sock", "status"])
            .env("GAMMARAY_LOG_JSON", value)
            .output()
            .expect("run the agent's status command");
        assert!(!out.status.success(), "{value}: there is no agent to ask");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for value in ["1", "true", "yes", "on", "0", "false", "no", "off"] {
        let stderr = status(value);
        assert!(stderr.contains("cannot reach the agent's control socket"), "{value}: {stderr}");
    }
    let stderr = status("maybe");
    assert!(stderr.contains("invalid value 'maybe' for '--log-json'"), "{stderr}");
}

#[test]
fn nothing_is_left_behind() {
    if !require_privileged("clean-up") {
        return;
    }
    let (run, links) = {
        let cluster = Cluster::new(2).expect("cluster");
        let mut agent = start_agent(&cluster, 1, AgentArgs::default());
        let (_backend, _servers) = backend(&cluster, 2, "backend-v1");
        let client = cluster.add_pod(1, "demo", "client").expect("client pod");
        agent.enrol(&client);
        let greeting = call_from(&client, SocketAddr::from((SERVICE_VIP, 80)));
        assert_eq!(greeting.hostname, "backend-v1", "reached the backend on the other node");
        let links = agent.status().attachment.link_ids;
        assert_eq!(links.len(), 2, "connect4 and sockops links");
        let exit = agent.stop(TIMEOUT).expect("agent exit status");
        assert!(exit.success(), "agent exits cleanly on SIGTERM: {exit:?}\n{}", agent.log_text());
        (cluster.run_name().to_owned(), links)
    };
    let left = gammaray_testkit::sweep::leftovers(&run);
    assert!(left.is_empty(), "left behind: {left:?}");
    let live: Vec<u32> = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
    for id in links {
        assert!(!live.contains(&id), "BPF link {id} still attached");
    }
}
