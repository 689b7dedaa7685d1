//! `microseg-cni`: run by the container runtime as a CNI plugin (`CNI_COMMAND` in
//! the environment), or by the DaemonSet to install itself on the node.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use microseg_cni::{
    config::{DEFAULT_SOCKET, DEFAULT_TIMEOUT, Environment},
    install::{self, ChainEntry, Chained},
    plugin,
};

const USAGE: &str = "\
usage:
  microseg-cni                 run by a container runtime as a CNI plugin (CNI_COMMAND set)
  microseg-cni install --bin-dir DIR --conf-dir DIR [--socket PATH] [--timeout-seconds N] [--watch SECONDS]
      copy this binary to DIR/microseg-cni and chain it into the node's network
      configuration (idempotent); with --watch, again every SECONDS until stopped
  microseg-cni uninstall --bin-dir DIR --conf-dir DIR
      remove the microseg-cni entries and the binary";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("install") => match InstallArgs::parse(&args[1..]) {
            Ok(install) => install.run(),
            Err(e) => usage_error(&e),
        },
        Some("uninstall") => match InstallArgs::parse(&args[1..]) {
            Ok(install) => install.uninstall(),
            Err(e) => usage_error(&e),
        },
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => usage_error(&format!("unknown argument {other:?}")),
        None => run_plugin(),
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("microseg-cni: {message}\n{USAGE}");
    ExitCode::from(2)
}

fn run_plugin() -> ExitCode {
    let environment = Environment::from_process();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&environment, &stdin),
        Err(e) => {
            let error = microseg_cni::spec::CniError::new(
                microseg_cni::spec::code::IO_FAILURE,
                "cannot read the network configuration from stdin",
                e.to_string(),
            );
            plugin::Outcome {
                stdout: format!("{}\n", error.to_json(microseg_cni::spec::NEWEST_VERSION)),
                stderr: Vec::new(),
                exit_code: 1,
            }
        }
    };
    for line in &outcome.stderr {
        eprintln!("{line}");
    }
    // Nothing else to tell the runtime if stdout is gone.
    let _ = std::io::stdout().write_all(outcome.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    if outcome.exit_code == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

struct InstallArgs {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    entry: ChainEntry,
    watch: Option<Duration>,
}

impl InstallArgs {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut bin_dir = None;
        let mut conf_dir = None;
        let mut entry = ChainEntry {
            socket: PathBuf::from(DEFAULT_SOCKET),
            timeout_seconds: DEFAULT_TIMEOUT.as_secs_f64(),
        };
        let mut watch = None;
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            let seconds = |text: String| {
                text.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("{flag}: {text:?} is not a positive number of seconds"))
            };
            match flag.as_str() {
                "--bin-dir" => bin_dir = Some(PathBuf::from(value()?)),
                "--conf-dir" => conf_dir = Some(PathBuf::from(value()?)),
                "--socket" => entry.socket = PathBuf::from(value()?),
                "--timeout-seconds" => entry.timeout_seconds = seconds(value()?)?,
                "--watch" => watch = Some(Duration::from_secs_f64(seconds(value()?)?)),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Self {
            bin_dir: bin_dir.ok_or("--bin-dir is required")?,
            conf_dir: conf_dir.ok_or("--conf-dir is required")?,
            entry,
            watch,
        })
    }

    fn run(self) -> ExitCode {
        let Some(every) = self.watch else {
            return if self.install_once(&mut None) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        };
        // As a container's first process, SIGTERM has no default action: wait for
        // it on this thread (blocked here and in the thread that inherits the mask),
        // and install on another.
        use nix::sys::signal::{SigSet, Signal};
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGTERM);
        signals.add(Signal::SIGINT);
        if let Err(e) = signals.thread_block() {
            eprintln!("microseg-cni: blocking SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
        std::thread::spawn(move || {
            let mut last_problem = None;
            loop {
                self.install_once(&mut last_problem);
                std::thread::sleep(every);
            }
        });
        match signals.wait() {
            Ok(signal) => {
                eprintln!("microseg-cni: {signal}; stopping (the installed plugin stays)");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("microseg-cni: waiting for signals: {e}");
                ExitCode::FAILURE
            }
        }
    }

    /// One pass; says what changed, and a problem once until it changes. True if
    /// the plugin is installed and chained.
    fn install_once(&self, last_problem: &mut Option<String>) -> bool {
        let source = std::env::current_exe();
        let binary = source
            .and_then(|source| install::install_binary(&source, &self.bin_dir))
            .map_err(|e| format!("installing into {}: {e}", self.bin_dir.display()));
        let chained = install::chain(&self.conf_dir, &self.entry);
        if let Ok(true) = binary {
            eprintln!(
                "microseg-cni: installed {}",
                self.bin_dir.join(install::PLUGIN_TYPE).display()
            );
        }
        if let Ok(Chained::Inserted(file)) = &chained {
            eprintln!(
                "microseg-cni: chained into {} (after the main plugin)",
                file.display()
            );
        }
        let problem = match (&binary, &chained) {
            (Err(e), _) | (_, Err(e)) => Some(e.clone()),
            _ => None,
        };
        if problem != *last_problem {
            match &problem {
                Some(problem) => eprintln!(
                    "microseg-cni: not chained: {problem}; new pods' veths are found by the agent alone"
                ),
                None if last_problem.is_some() => eprintln!("microseg-cni: chained again"),
                None => {}
            }
            last_problem.clone_from(&problem);
        }
        problem.is_none()
    }

    fn uninstall(self) -> ExitCode {
        let mut failed = false;
        match install::unchain(&self.conf_dir) {
            Ok(files) => {
                for file in files {
                    eprintln!("microseg-cni: removed from {}", file.display());
                }
            }
            Err(e) => {
                eprintln!("microseg-cni: {e}");
                failed = true;
            }
        }
        match install::remove_binary(&self.bin_dir) {
            Ok(true) => eprintln!(
                "microseg-cni: removed {}",
                self.bin_dir.join(install::PLUGIN_TYPE).display()
            ),
            Ok(false) => {}
            Err(e) => {
                eprintln!("microseg-cni: removing the binary: {e}");
                failed = true;
            }
        }
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}
