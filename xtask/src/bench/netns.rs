//! Network namespaces and a veth pair created by the benchmark and removed when their
//! guards drop (on success, error and panic alike). Names carry this process's id, so
//! leftovers of a killed run can be told apart and removed by the next one.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    process::{Command, Output, Stdio},
};

use anyhow::{Context, bail};

/// Prefix of every namespace the benchmark creates.
const PREFIX: &str = "msbench-";

/// Runs a command; fails with its stderr if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Removes namespaces left by benchmark runs whose process is gone.
pub fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "delete", name]).output();
        }
    }
}

/// A network namespace, deleted (with its interfaces and packet filter rules) on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    pub fn new(role: &str) -> anyhow::Result<Self> {
        let name = format!("{PREFIX}{}-{role}", std::process::id());
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        run("ip", &["netns", "add", &name])?;
        let namespace = Self { name };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace with `input` on its standard input.
    pub fn exec_with_input(&self, command: &[&str], input: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(command);
        let mut child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", command.join(" ")))?;
        child
            .stdin
            .take()
            .context("stdin is piped")?
            .write_all(input.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "{} failed: {}",
                command.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace: interfaces it names and
    /// /proc/thread-self/net files it opens are this namespace's.
    pub fn run_in<T: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let opened = path.clone();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&opened).with_context(|| format!("opening {opened}"))?;
                    enter(&file).with_context(|| format!("entering {opened}"))?;
                    f()
                })
                .join()
                .map_err(|_| anyhow::anyhow!("a thread inside namespace {path} panicked"))?
        })
    }

    /// Opens a file of /proc/thread-self/net (e.g. "dev", "snmp") of this namespace.
    pub fn proc_net(&self, file: &str) -> anyhow::Result<ProcFile> {
        let path = format!("/proc/thread-self/net/{file}");
        self.run_in(move || {
            Ok(ProcFile(
                File::open(&path).with_context(|| format!("opening {path}"))?,
            ))
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
    }
}

/// Moves the calling thread into the network namespace of `file`.
fn enter(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns only reads the fd, which `file` keeps open for the call; it
    // changes the calling thread's network namespace and nothing else.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A /proc file of one namespace, re-read from the start on each `read`.
pub struct ProcFile(File);

impl ProcFile {
    pub fn read(&mut self) -> anyhow::Result<String> {
        self.0.seek(SeekFrom::Start(0))?;
        let mut text = String::new();
        self.0.read_to_string(&mut text)?;
        Ok(text)
    }
}

/// A veth pair from namespace `a` to namespace `b`; deleting either end (or either
/// namespace) removes both, which `Drop` does.
pub struct Veth {
    pub a_name: String,
    pub b_name: String,
    namespace_a: String,
}

impl Veth {
    pub fn new(a: &Namespace, b: &Namespace) -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
        let veth = Self {
            a_name: format!("msbtx{id}"),
            b_name: format!("msbrx{id}"),
            namespace_a: a.name.clone(),
        };
        run(
            "ip",
            &[
                "link",
                "add",
                &veth.a_name,
                "netns",
                &a.name,
                "type",
                "veth",
                "peer",
                "name",
                &veth.b_name,
                "netns",
                &b.name,
            ],
        )?;
        Ok(veth)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.namespace_a, "link", "del", &self.a_name])
            .output();
    }
}

/// The MAC address of `interface` in `namespace`.
pub fn mac_of(namespace: &Namespace, interface: &str) -> anyhow::Result<String> {
    let output = namespace.ip(&["-j", "link", "show", "dev", interface])?;
    let links: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    links[0]["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no MAC address for {interface}"))
}
