//! The documentation cannot drift from the program: every command shown in a shell
//! block of README.md and docs/*.md is checked.
//!
//! - A `microseg` command must parse as the binary parses it.
//! - It then runs, when it can run here: an offline command (`check`, `compile`,
//!   `graph -f`, `diff --base`, `suggest --from-file`) whose files are in the
//!   repository. When the block shows its output (a `console` block, `$ ` before
//!   the command), the output must be what it prints.
//! - Otherwise its line says why it does not run here, `# needs: a cluster` (a
//!   running agent, the hubble CLI, ...), or which test runs it, `# tested: e2e_x`
//!   (that test must exist and use the subcommand).
//! - `cargo xtask SUB` must name a subcommand and flags xtask accepts.
//! - Any other program needs a `# needs:` line of its own.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use microseg_tests::lab::microseg_binary;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// The documentation files: README.md and docs/*.md (not the benchmark reports).
fn documentation() -> Vec<PathBuf> {
    let root = repository();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("docs entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// One command as a document shows it.
#[derive(Debug)]
struct Shown {
    /// `file:line`, for messages.
    place: String,
    /// The command, continuation lines joined, without its comment.
    command: String,
    /// Its trailing comment, if any.
    comment: String,
    /// The output shown after it (console blocks), if any.
    output: Option<String>,
}

/// The commands in `text`'s shell blocks (`sh`, `bash`, `shell`, `console`). A block
/// without a language that holds a `$ ` prompt is an error: tag it, so it is checked.
fn shown_commands(file: &str, text: &str) -> Result<Vec<Shown>, String> {
    let mut found: Vec<Shown> = Vec::new();
    let mut block: Option<String> = None;
    let mut pending = String::new();
    let mut pending_line = 0;
    // A comment line of its own saying `needs:` or `tested:` holds for the
    // block's commands below it.
    let mut block_marker = String::new();
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            block = match block {
                None => Some(fence.trim().to_owned()),
                Some(_) => None,
            };
            block_marker.clear();
            continue;
        }
        let Some(language) = &block else { continue };
        let console = language == "console";
        if language.is_empty() && line.starts_with("$ ") {
            return Err(format!(
                "{file}:{number}: a block with `$ ` prompts needs a language (console)"
            ));
        }
        if !matches!(language.as_str(), "sh" | "bash" | "shell" | "console") {
            continue;
        }
        let command_text = if console {
            match line.strip_prefix("$ ") {
                Some(command) => Some(command),
                None if !pending.is_empty() => Some(line.trim_start()),
                None => {
                    // Output of the last command.
                    if let Some(last) = found.last_mut()
                        && last.output.is_some()
                    {
                        let output = last.output.as_mut().expect("checked");
                        output.push_str(line);
                        output.push('\n');
                    }
                    continue;
                }
            }
        } else {
            let trimmed = line.trim_start();
            if let Some(comment) = trimmed.strip_prefix('#')
                && pending.is_empty()
                && (marker(comment, "needs").is_some() || marker(comment, "tested").is_some())
            {
                block_marker = comment.trim().to_owned();
            }
            (!trimmed.is_empty() && (!trimmed.starts_with('#') || !pending.is_empty()))
                .then_some(line)
        };
        let Some(command_text) = command_text else {
            continue;
        };
        if pending.is_empty() {
            pending_line = number;
        }
        match command_text.strip_suffix('\\') {
            Some(part) => {
                pending.push_str(part);
                pending.push(' ');
            }
            None => {
                pending.push_str(command_text);
                let (command, mut comment) = split_comment(&pending);
                if marker(&comment, "needs").is_none() && marker(&comment, "tested").is_none() {
                    comment = format!("{comment}; {block_marker}");
                }
                found.push(Shown {
                    place: format!("{file}:{pending_line}"),
                    command,
                    comment,
                    output: console.then(String::new),
                });
                pending.clear();
            }
        }
    }
    Ok(found)
}

/// Splits `line` at its first `#` outside quotes that starts a word.
fn split_comment(line: &str) -> (String, String) {
    let mut quote: Option<char> = None;
    let mut previous = ' ';
    for (index, c) in line.char_indices() {
        match (quote, c) {
            (Some(open), c) if c == open => quote = None,
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') if previous.is_whitespace() => {
                return (
                    line[..index].trim().to_owned(),
                    line[index + 1..].trim().to_owned(),
                );
            }
            _ => {}
        }
        previous = c;
    }
    (line.trim().to_owned(), String::new())
}

/// What a comment says about its command: `needs: WHAT` or `tested: TEST`.
fn marker<'a>(comment: &'a str, name: &str) -> Option<&'a str> {
    let start = comment.find(&format!("{name}:"))? + name.len() + 1;
    let rest = &comment[start..];
    Some(rest.split(';').next().unwrap_or(rest).trim())
}

/// The simple commands of a command line: split at `|`, `&&`, `;`, without
/// redirections.
fn simple_commands(command: &str) -> Result<Vec<Vec<String>>, String> {
    let words = shlex::split(command).ok_or_else(|| format!("cannot split `{command}`"))?;
    let mut commands = vec![Vec::new()];
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "|" | "&&" | ";" | "||" => commands.push(Vec::new()),
            ">" | ">>" | "<" | "2>" => {
                words.next();
            }
            _ if word.starts_with('>') || word.starts_with("2>") => {}
            _ => commands.last_mut().expect("one at least").push(word),
        }
    }
    commands.retain(|c| !c.is_empty());
    Ok(commands)
}

/// How one `microseg` command was checked.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Checked {
    Ran,
    RanAndOutputMatched,
    TestedBy,
    Needs,
}

/// Whether a microseg command can run here, offline: the subcommands that read files
/// only, with every path they name in the repository.
fn runs_offline(args: &[String], root: &Path) -> bool {
    let Some(subcommand) = args.get(1) else {
        return false;
    };
    let reads_files_only = match subcommand.as_str() {
        "check" | "compile" => true,
        "graph" => args.iter().any(|a| a == "-f" || a == "--filename"),
        "diff" => args.iter().any(|a| a == "--base"),
        "suggest" => args.iter().any(|a| a == "--from-file"),
        _ => false,
    };
    let path_flags = [
        "-f",
        "--filename",
        "--policy",
        "--inventory",
        "--base",
        "--from-file",
        "--flows",
    ];
    let paths_exist = args
        .windows(2)
        .filter(|pair| path_flags.contains(&pair[0].as_str()))
        .all(|pair| root.join(&pair[1]).exists());
    reads_files_only && paths_exist
}

fn check_microseg(shown: &Shown, args: &[String], root: &Path) -> Result<Checked, String> {
    let place = &shown.place;
    microseg::cli::check_command_line(args)
        .map_err(|e| format!("{place}: `{}` does not parse:\n{e}", shown.command))?;
    if let Some(test) = marker(&shown.comment, "tested") {
        let file = root.join("tests/tests").join(format!("{test}.rs"));
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("{place}: `tested: {test}`: {}: {e}", file.display()))?;
        let subcommand = &args[1];
        if !text.contains(&format!("\"{subcommand}\"")) {
            return Err(format!(
                "{place}: `tested: {test}`, but {} never runs `{subcommand}`",
                file.display()
            ));
        }
        return Ok(Checked::TestedBy);
    }
    if marker(&shown.comment, "needs").is_some() {
        return Ok(Checked::Needs);
    }
    if !runs_offline(args, root) {
        return Err(format!(
            "{place}: `{}` cannot run offline here: add `# needs: WHAT` or `# tested: TEST`",
            shown.command
        ));
    }
    if args.iter().any(|a| a == "--datapath")
        && !microseg_tests::kernel_available("docs_commands (check --datapath)")
    {
        return Ok(Checked::Needs);
    }
    let output = Command::new(microseg_binary())
        .args(&args[1..])
        .current_dir(root)
        .output()
        .map_err(|e| format!("{place}: running microseg: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // `check` exits 2 for a denial; an invalid policy set (an example of an error) 1.
    let expected_failure = shown
        .output
        .as_deref()
        .is_some_and(|o| o.starts_with("error:"));
    let ok = match output.status.code() {
        Some(0) => true,
        Some(2) => args[1] == "check",
        Some(1) => expected_failure,
        _ => false,
    };
    if !ok {
        return Err(format!(
            "{place}: `{}` failed ({}):\n{stdout}{}",
            shown.command,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let Some(shown_output) = shown.output.as_deref().filter(|o| !o.trim().is_empty()) else {
        return Ok(Checked::Ran);
    };
    let printed = if expected_failure {
        String::from_utf8_lossy(&output.stderr).into_owned()
    } else {
        stdout.into_owned()
    };
    let normalise = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.trim_end().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    };
    if normalise(&printed) != normalise(shown_output) {
        return Err(format!(
            "{place}: `{}` prints\n{printed}\nbut the documentation shows\n{shown_output}",
            shown.command
        ));
    }
    Ok(Checked::RanAndOutputMatched)
}

/// `cargo xtask SUB ...`: xtask must accept it (`--help` after it stops short of
/// running it).
fn check_xtask(shown: &Shown, args: &[String], root: &Path) -> Result<(), String> {
    let output = Command::new(env!("CARGO"))
        .args(["run", "-q", "-p", "xtask", "--"])
        .args(&args[2..])
        .arg("--help")
        .current_dir(root)
        .output()
        .map_err(|e| format!("{}: running cargo: {e}", shown.place))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: xtask does not accept `{}`:\n{}",
            shown.place,
            shown.command,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn every_command_the_documentation_shows_parses_and_runs_or_says_why_not() {
    let root = repository();
    let mut errors = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut xtask_checked = std::collections::BTreeSet::new();
    for file in documentation() {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&file).expect("documentation file");
        let shown = match shown_commands(&name, &text) {
            Ok(shown) => shown,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for shown in shown {
            let commands = match simple_commands(&shown.command) {
                Ok(commands) => commands,
                Err(e) => {
                    errors.push(format!("{}: {e}", shown.place));
                    continue;
                }
            };
            // Only the first command of a pipeline is the documented one; the rest
            // (`dot -Tsvg`, `jq`) consume its output.
            let Some(args) = commands.into_iter().next() else {
                continue;
            };
            let args: Vec<String> = args.into_iter().skip_while(|w| w == "sudo").collect();
            let result = match args[0].as_str() {
                "microseg" => check_microseg(&shown, &args, &root).map(|c| format!("{c:?}")),
                "cargo" if args.get(1).is_some_and(|a| a == "xtask") => {
                    // One check per subcommand line is enough.
                    if xtask_checked.insert(args.clone()) {
                        check_xtask(&shown, &args, &root).map(|()| "xtask".to_owned())
                    } else {
                        Ok("xtask".to_owned())
                    }
                }
                program => match marker(&shown.comment, "needs") {
                    Some(_) => Ok(format!("{program}: needs")),
                    None => Err(format!(
                        "{}: `{}`: {program} commands need `# needs: WHAT`",
                        shown.place, shown.command
                    )),
                },
            };
            match result {
                Ok(how) => *counts.entry(how).or_default() += 1,
                Err(e) => errors.push(e),
            }
        }
    }
    eprintln!("documentation commands: {counts:?}");
    assert!(
        errors.is_empty(),
        "{} documentation command(s) wrong:\n\n{}",
        errors.len(),
        errors.join("\n\n")
    );
    assert!(
        counts.get("RanAndOutputMatched").copied().unwrap_or(0) >= 3,
        "the documentation should show at least three commands with their output: {counts:?}"
    );
}

#[test]
fn commands_are_read_from_shell_blocks_with_their_comments_and_output() {
    let text = "```sh\nmicroseg get policies -A   # needs: an agent\n# a comment\nmicroseg graph \\\n  -f x -o dot | dot -Tsvg > g.svg\n```\n\n```console\n$ microseg check --from a \\\n    --to b\na -> b: ALLOW\n  why\n```\n```yaml\nkind: Pod\n```\n";
    let shown = shown_commands("t.md", text).unwrap();
    assert_eq!(shown.len(), 3, "{shown:?}");
    assert_eq!(shown[0].command, "microseg get policies -A");
    assert_eq!(marker(&shown[0].comment, "needs"), Some("an agent"));
    assert_eq!(
        shown[1].command,
        "microseg graph    -f x -o dot | dot -Tsvg > g.svg"
    );
    assert_eq!(
        simple_commands(&shown[1].command).unwrap(),
        [
            vec!["microseg", "graph", "-f", "x", "-o", "dot"],
            vec!["dot", "-Tsvg"]
        ]
    );
    assert_eq!(shown[2].command, "microseg check --from a  --to b");
    assert_eq!(shown[2].output.as_deref(), Some("a -> b: ALLOW\n  why\n"));
    assert_eq!(
        marker("podSelector: {}; tested: e2e_agent", "tested"),
        Some("e2e_agent")
    );
    assert!(shown_commands("t.md", "```\n$ microseg status\n```\n").is_err());
    // A marker line of its own holds for the commands below it in its block only.
    let text = "```sh\n# needs: the hubble CLI\nhubble observe\nhubble status\n```\n```sh\nhubble observe\n```\n";
    let shown = shown_commands("t.md", text).unwrap();
    assert_eq!(marker(&shown[1].comment, "needs"), Some("the hubble CLI"));
    assert_eq!(marker(&shown[2].comment, "needs"), None);
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings (outside code blocks).
fn anchors(text: &str) -> std::collections::BTreeSet<String> {
    let mut in_code = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
            }
            !in_code
        })
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| anchor(heading.trim_start_matches('#').trim()))
        .collect()
}

#[test]
fn every_link_between_the_documents_leads_somewhere() {
    let link = |text: &str| -> Vec<String> {
        let mut found = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("](") {
            rest = &rest[start + 2..];
            if let Some(end) = rest.find(')') {
                found.push(rest[..end].to_owned());
            }
        }
        found
    };
    let mut errors = Vec::new();
    let mut checked = 0;
    for file in documentation() {
        let text = std::fs::read_to_string(&file).expect("documentation file");
        for target in link(&text) {
            if target.starts_with("http") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a directory").join(path)
            };
            checked += 1;
            if !resolved.exists() {
                errors.push(format!("{}: {target}: no such file", file.display()));
                continue;
            }
            if !fragment.is_empty() {
                let target_text = std::fs::read_to_string(&resolved).unwrap_or_default();
                if !anchors(&target_text).contains(fragment) {
                    errors.push(format!("{}: {target}: no such heading", file.display()));
                }
            }
        }
    }
    assert!(checked > 10, "only {checked} links found");
    assert!(errors.is_empty(), "broken links:\n{}", errors.join("\n"));
}
