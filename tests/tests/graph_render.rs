//! `microseg graph` renders: its DOT through Graphviz (`dot -Tsvg`, `dot -Tpng`),
//! its SVG and HTML as well-formed XML with nothing fetched from elsewhere, and the
//! HTML page in a headless browser, whose screenshot shows the drawing (allowed
//! edges in blue, the denied observed flow in red) rather than a blank page.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use microseg_tests::lab::microseg_binary;

/// Parses XML; a DOCTYPE (HTML's, Graphviz's SVG's) is allowed.
fn parse_xml(text: &str) -> Result<roxmltree::Document<'_>, roxmltree::Error> {
    roxmltree::Document::parse_with_options(
        text,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
}

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A scratch directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("microseg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first of `candidates` on the PATH. Missing: a failure under `CI=true`
/// (`cargo xtask setup` installs it), else a recorded skip.
fn tool(test: &str, candidates: &[&str], package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = candidates.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        let reason = format!(
            "none of {candidates:?} is installed (Debian package {package}; `cargo xtask setup` installs it)"
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: {reason}");
        }
        microseg_tests::skip(test, &reason);
    }
    found
}

/// Runs `microseg graph ARGS` and returns its output.
fn graph(args: &[&str]) -> String {
    let output = Command::new(microseg_binary())
        .arg("graph")
        .args(args)
        .current_dir(repository())
        .output()
        .expect("microseg runs");
    assert!(
        output.status.success(),
        "microseg graph {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// A denied flow from a client in another namespace to the frontend, as `microseg
/// events -o json` writes it.
const DENIED_FLOW: &str = r#"{"verdict":"DROPPED","IP":{"source":"10.40.0.10","destination":"10.10.1.11"},"l4":{"TCP":{"source_port":40001,"destination_port":443,"flags":{"SYN":true}}}}"#;

fn write_flows(dir: &Path) -> String {
    let path = dir.join("flows.json");
    std::fs::write(&path, format!("{DENIED_FLOW}\n{DENIED_FLOW}\n")).unwrap();
    path.display().to_string()
}

#[test]
fn graphviz_renders_the_dot_output() {
    let test = "graphviz_renders_the_dot_output";
    let Some(dot) = tool(test, &["dot"], "graphviz") else {
        return;
    };
    let dir = TempDir::new("graph-dot");
    let flows = write_flows(&dir.0);
    for by in ["workload", "namespace"] {
        let source = graph(&[
            "-f",
            "examples/three-tier",
            "--by",
            by,
            "--flows",
            &flows,
            "-o",
            "dot",
        ]);
        assert!(
            source.contains("TCP/443 (production/frontend-policy)"),
            "{source}"
        );
        assert!(source.contains("denied TCP/443 x2"), "{source}");
        let file = dir.0.join(format!("{by}.dot"));
        std::fs::write(&file, &source).unwrap();
        for format in ["svg", "png"] {
            let out = dir.0.join(format!("{by}.{format}"));
            let result = Command::new(&dot)
                .arg(format!("-T{format}"))
                .arg(&file)
                .arg("-o")
                .arg(&out)
                .output()
                .expect("dot runs");
            assert!(
                result.status.success(),
                "dot -T{format} on the {by} graph: {}",
                String::from_utf8_lossy(&result.stderr)
            );
            assert!(std::fs::metadata(&out).unwrap().len() > 1000);
        }
        let svg = std::fs::read_to_string(dir.0.join(format!("{by}.svg"))).unwrap();
        let document = parse_xml(&svg).expect("dot's SVG is XML");
        // Graphviz drew every edge of the DOT (one `class="edge"` group each).
        let edges = document
            .descendants()
            .filter(|n| n.attribute("class") == Some("edge"))
            .count();
        assert_eq!(edges, source.matches(" -> ").count(), "{by}");
    }
}

#[test]
fn the_svg_and_html_pages_are_well_formed_and_self_contained() {
    let dir = TempDir::new("graph-xml");
    let flows = write_flows(&dir.0);
    for by in ["workload", "namespace"] {
        for format in ["svg", "html"] {
            let text = graph(&[
                "-f",
                "examples/three-tier",
                "--by",
                by,
                "--flows",
                &flows,
                "-o",
                format,
            ]);
            let document =
                parse_xml(&text).unwrap_or_else(|e| panic!("the {by} {format} is not XML: {e}"));
            for node in document.descendants().filter(|n| n.is_element()) {
                assert_ne!(node.tag_name().name(), "script", "{format}: no scripts");
                for attribute in node.attributes() {
                    let value = attribute.value();
                    assert!(
                        !(attribute.name() == "href" || attribute.name() == "src")
                            || value.starts_with('#'),
                        "{format}: {}={value} fetches something",
                        attribute.name()
                    );
                }
            }
            assert!(!text.contains("@import") && !text.contains("url(http"));
            let svg = document
                .descendants()
                .find(|n| n.tag_name().name() == "svg")
                .expect("an svg element");
            assert!(svg.attribute("viewBox").is_some());
            let texts: Vec<&str> = svg
                .descendants()
                .filter(|n| n.tag_name().name() == "text")
                .filter_map(|n| n.text())
                .collect();
            assert!(texts.contains(&"denied TCP/443 x2"), "{texts:?}");
            if by == "workload" {
                assert!(texts.contains(&"namespace production"), "{texts:?}");
                assert!(texts.contains(&"postgresql"), "{texts:?}");
                assert!(texts.contains(&"production/database-policy"), "{texts:?}");
            }
        }
    }
}

/// Counts the screenshot's pixels: (not white, blue of allowed edges, red of the
/// denied flow).
fn count_pixels(png_path: &Path) -> (usize, usize, usize, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).expect("the screenshot exists"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buffer = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buffer).expect("a frame");
    let channels = info.color_type.samples();
    assert!(
        info.bit_depth == png::BitDepth::Eight && channels >= 3,
        "{:?} {:?}",
        info.color_type,
        info.bit_depth
    );
    let (mut ink, mut blue, mut red) = (0, 0, 0);
    let total = (info.width * info.height) as usize;
    for pixel in buffer[..info.buffer_size()].chunks(channels) {
        let (r, g, b) = (
            i32::from(pixel[0]),
            i32::from(pixel[1]),
            i32::from(pixel[2]),
        );
        if r < 235 || g < 235 || b < 235 {
            ink += 1;
        }
        // #1f5fa8 and #c62828, anti-aliased shades included.
        if b > 120 && b - r > 60 && b - g > 25 {
            blue += 1;
        }
        if r > 150 && r - g > 80 && r - b > 80 {
            red += 1;
        }
    }
    (total, ink, blue, red)
}

#[test]
fn a_headless_browser_draws_the_html_page() {
    let test = "a_headless_browser_draws_the_html_page";
    let Some(browser) = tool(
        test,
        &["chromium-headless-shell", "chromium", "chromium-browser"],
        "chromium-headless-shell",
    ) else {
        return;
    };
    let dir = TempDir::new("graph-browser");
    let flows = write_flows(&dir.0);
    let page = dir.0.join("graph.html");
    std::fs::write(
        &page,
        graph(&["-f", "examples/three-tier", "--flows", &flows, "-o", "html"]),
    )
    .unwrap();
    let screenshot = dir.0.join("graph.png");
    // As root the browser needs --no-sandbox; its profile goes in the scratch
    // directory; no network is involved (a file: URL, nothing fetched).
    let mut child = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1300,800",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.0.join("profile").display()
        ))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the browser starts");
    // A hung browser must not hang the suite: it is killed after two minutes (a
    // bound on waiting, not a timing asserted).
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not finish its screenshot", browser.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{}: {stderr}", browser.display());
    let (total, ink, blue, red) = count_pixels(&screenshot);
    eprintln!("screenshot: {total} pixels, {ink} not white, {blue} blue, {red} red");
    assert!(
        ink > total / 50,
        "the page is (nearly) blank: {ink} of {total}"
    );
    assert!(
        blue > 2_000,
        "the allowed edges and boxes are drawn: {blue} blue pixels"
    );
    assert!(red > 200, "the denied flow is drawn: {red} red pixels");
}
