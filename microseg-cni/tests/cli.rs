//! The `microseg-cni` binary as runtimes and the DaemonSet run it: the plugin's
//! answers that need no agent or kernel, and `install` / `uninstall` on a node's
//! directories. (The plugin against a real agent and real plugins:
//! tests/tests/e2e_cni.rs.)

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_microseg-cni");

fn run_plugin(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(BINARY)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running microseg-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("stdin");
    child.wait_with_output().expect("output")
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn version_and_errors_follow_the_spec() {
    let version = run_plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(version.status.success());
    assert_eq!(
        stdout_json(&version),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );

    // Not chained: an error object on stdout, a non-zero exit.
    let unchained = run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ],
        r#"{"cniVersion":"1.0.0","name":"k8s","type":"microseg-cni"}"#,
    );
    assert!(!unchained.status.success());
    let error = stdout_json(&unchained);
    assert_eq!(error["code"], 7, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0");
    assert!(!unchained.stderr.is_empty(), "the reason is logged too");

    let no_command = run_plugin(&[], r#"{"cniVersion":"1.0.0"}"#);
    assert!(!no_command.status.success());
    assert_eq!(stdout_json(&no_command)["code"], 4);
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("microseg-cni-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn installer(command: &str, bin: &Path, conf: &Path) -> Output {
    Command::new(BINARY)
        .args([command, "--bin-dir"])
        .arg(bin)
        .arg("--conf-dir")
        .arg(conf)
        .output()
        .expect("running microseg-cni")
}

#[test]
fn install_chains_once_and_uninstall_removes_only_its_own() {
    let dir = temp_dir("install");
    let (bin, conf) = (dir.join("opt-cni-bin"), dir.join("etc-cni-net.d"));
    std::fs::create_dir_all(&conf).unwrap();
    let conflist = conf.join("10-flannel.conflist");
    let original = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
    std::fs::write(&conflist, original).unwrap();

    for _ in 0..2 {
        let install = installer("install", &bin, &conf);
        assert!(
            install.status.success(),
            "{}",
            String::from_utf8_lossy(&install.stderr)
        );
    }
    assert_eq!(
        std::fs::read(bin.join("microseg-cni")).unwrap(),
        std::fs::read(BINARY).unwrap()
    );
    let chained: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    let types: Vec<&str> = chained["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["flannel", "portmap", "microseg-cni"]);
    assert_eq!(
        chained["plugins"][2],
        json!({"type": "microseg-cni", "socket": "/run/microseg/microseg.sock", "timeoutSeconds": 30.0})
    );

    let uninstall = installer("uninstall", &bin, &conf);
    assert!(uninstall.status.success());
    assert!(!bin.join("microseg-cni").exists());
    let restored: Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(restored, serde_json::from_str::<Value>(original).unwrap());

    // A node whose only configuration is a single plugin: refused, untouched.
    std::fs::remove_file(&conflist).unwrap();
    let single = conf.join("10-bridge.conf");
    std::fs::write(
        &single,
        r#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#,
    )
    .unwrap();
    let refused = installer("install", &bin, &conf);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("single-plugin"));
    assert_eq!(
        std::fs::read_to_string(&single).unwrap(),
        r#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The DaemonSet's `cni-install` container: waits for the main plugin's list,
/// chains as soon as it is written, chains again when the main plugin rewrites it,
/// and stops on SIGTERM (as its container's first process it has no default
/// action for it).
#[test]
fn install_watch_chains_again_after_the_main_plugin_rewrites_its_list() {
    use std::io::BufRead;
    let dir = temp_dir("watch");
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    let mut watcher = Command::new(BINARY)
        .args(["install", "--watch", "0.1", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running microseg-cni install --watch");
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = watcher.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    // Stopped even if an assertion fails.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut watcher = Stop(watcher);
    let mut log: Vec<String> = Vec::new();
    // The next line of the log that says `what`.
    let mut wait_for = |what: &str| loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {what:?} in the installer's log: {log:#?}"));
        log.push(line);
        if log.last().is_some_and(|line| line.contains(what)) {
            return;
        }
    };
    // The main plugin's installer has not run yet.
    wait_for("no network configuration");
    std::fs::create_dir_all(&conf).unwrap();
    let conflist = conf.join("10-calico.conflist");
    let main_plugins_list =
        r#"{"name":"k8s-pod-network","cniVersion":"1.0.0","plugins":[{"type":"calico"}]}"#;
    std::fs::write(&conflist, main_plugins_list).unwrap();
    wait_for("chained into");
    let chained = |text: &str| {
        serde_json::from_str::<Value>(text).unwrap()["plugins"][1]["type"] == "microseg-cni"
    };
    assert!(chained(&std::fs::read_to_string(&conflist).unwrap()));
    assert!(bin.join("microseg-cni").exists());
    // The main plugin writes its list again (its own agent restarted).
    std::fs::write(&conflist, main_plugins_list).unwrap();
    wait_for("chained into");
    assert!(chained(&std::fs::read_to_string(&conflist).unwrap()));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watcher.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = watcher.0.wait().expect("the installer's exit");
    assert!(status.success(), "{status:?}");
    let _ = reader.join();
    let _ = std::fs::remove_dir_all(&dir);
}
