//! `kwq new` and `kwq build`: from an empty directory to a task module in
//! Rust, Python or JavaScript.
//!
//! A project is written from templates compiled into this binary
//! (`guest-sdk/templates`), with the WIT contract and the language's SDK
//! copied from the same binary, so a project always matches the host that
//! made it. `kwq.toml` at its root records its name and language, which is
//! all `kwq build` needs. The build runs the language's own tool and
//! installs nothing: a missing tool is named with the command that installs it.

use super::CliError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The language of a task project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Lang {
    /// Rust with the kwq-guest crate, built by cargo for wasm32-wasip2.
    Rust,
    /// Python with the kwq_task package, built by componentize-py.
    Python,
    /// JavaScript with the kwq-task module, built by componentize-js.
    Js,
}

/// Arguments of `kwq new`.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The module's name (lowercase letters, digits and `-`); also the
    /// directory created, unless --dir says otherwise.
    name: String,
    /// The language of the task.
    #[arg(long, value_enum)]
    lang: Lang,
    /// Which task to start from.
    #[arg(long, value_enum, default_value = "pricer")]
    example: Example,
    /// Where to write the project (must not exist, or be empty).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The task a new project starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Example {
    /// A European option priced by Monte Carlo with antithetic variates:
    /// `{spot, strike, rate, vol, maturity, kind, paths, seed}` in,
    /// `{price, std_error, paths}` out.
    Pricer,
    /// Pi by Monte Carlo: `{samples, seed}` in, `{estimate, std_error, inside, samples}` out.
    Pi,
}

impl Example {
    fn description(self) -> &'static str {
        match self {
            Example::Pricer => "it prices a European\noption by Monte Carlo",
            Example::Pi => "it estimates pi by Monte\nCarlo",
        }
    }
}

/// Arguments of `kwq build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The project directory (the one with kwq.toml).
    #[arg(default_value = ".")]
    dir: PathBuf,
}

/// What `kwq.toml` holds.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// The module's name: the output is `dist/NAME.wasm`.
    name: String,
    /// Which tool builds it.
    lang: Lang,
}

/// One file of a template: where it goes in the project, and its text
/// (`{{name}}` and `{{wit_bindgen}}` are filled in).
struct TemplateFile {
    path: &'static str,
    text: &'static str,
}

macro_rules! template {
    ($path:literal => $source:literal) => {
        TemplateFile {
            path: $path,
            text: include_str!(concat!("../../../", $source)),
        }
    };
}

/// Files every project has.
const COMMON: &[TemplateFile] = &[template!("wit/kwq-task.wit" => "wit/kwq-task.wit")];

const PRICER: &[TemplateFile] = &[
    template!("payload.json" => "guest-sdk/templates/common/payload.json"),
    template!("payloads.json" => "guest-sdk/templates/common/payloads.json"),
];

const PI: &[TemplateFile] = &[
    template!("payload.json" => "guest-sdk/templates/common/pi/payload.json"),
    template!("payloads.json" => "guest-sdk/templates/common/pi/payloads.json"),
];

const RUST_PRICER: &[TemplateFile] =
    &[template!("src/lib.rs" => "guest-sdk/templates/rust/src/lib.rs")];

const RUST_PI: &[TemplateFile] =
    &[template!("src/lib.rs" => "guest-sdk/templates/rust/pi/src/lib.rs")];

const PYTHON_PRICER: &[TemplateFile] = &[
    template!("app.py" => "guest-sdk/templates/python/app.py"),
    template!("test_app.py" => "guest-sdk/templates/python/test_app.py"),
];

const PYTHON_PI: &[TemplateFile] = &[
    template!("app.py" => "guest-sdk/templates/python/pi/app.py"),
    template!("test_app.py" => "guest-sdk/templates/python/pi/test_app.py"),
];

const JS_PRICER: &[TemplateFile] = &[
    template!("src/task.js" => "guest-sdk/templates/js/src/task.js"),
    template!("test/task.test.js" => "guest-sdk/templates/js/test/task.test.js"),
];

const JS_PI: &[TemplateFile] = &[
    template!("src/task.js" => "guest-sdk/templates/js/pi/src/task.js"),
    template!("test/task.test.js" => "guest-sdk/templates/js/pi/test/task.test.js"),
];

const RUST: &[TemplateFile] = &[
    template!("Cargo.toml" => "guest-sdk/templates/rust/Cargo.toml"),
    template!("kwq-guest/Cargo.toml" => "guest-sdk/templates/rust/kwq-guest/Cargo.toml"),
    template!("kwq-guest/src/lib.rs" => "guest-sdk/src/lib.rs"),
    template!("README.md" => "guest-sdk/templates/rust/README.md"),
    template!(".gitignore" => "guest-sdk/templates/rust/gitignore"),
];

const PYTHON: &[TemplateFile] = &[
    template!("kwq_task/__init__.py" => "guest-sdk/python/kwq_task/__init__.py"),
    template!("README.md" => "guest-sdk/templates/python/README.md"),
    template!(".gitignore" => "guest-sdk/templates/python/gitignore"),
];

const JS: &[TemplateFile] = &[
    template!("package.json" => "guest-sdk/templates/js/package.json"),
    template!("kwq-task/index.js" => "guest-sdk/js/kwq-task/index.js"),
    template!("kwq-task/entry.js" => "guest-sdk/js/kwq-task/entry.js"),
    template!("README.md" => "guest-sdk/templates/js/README.md"),
    template!(".gitignore" => "guest-sdk/templates/js/gitignore"),
];

/// The wit-bindgen the vendored Rust SDK asks for: the one this binary's
/// own SDK was built and tested with.
const WIT_BINDGEN_VERSION: &str = "0.61";

/// Tool versions a project is tested with, named in install hints.
const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

impl Lang {
    fn display_name(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }

    /// The project's files: the language's SDK and set-up, the example's
    /// task and test, and the example's payloads.
    fn files(self, example: Example) -> impl Iterator<Item = &'static TemplateFile> {
        let (base, task) = match (self, example) {
            (Lang::Rust, Example::Pricer) => (RUST, RUST_PRICER),
            (Lang::Rust, Example::Pi) => (RUST, RUST_PI),
            (Lang::Python, Example::Pricer) => (PYTHON, PYTHON_PRICER),
            (Lang::Python, Example::Pi) => (PYTHON, PYTHON_PI),
            (Lang::Js, Example::Pricer) => (JS, JS_PRICER),
            (Lang::Js, Example::Pi) => (JS, JS_PI),
        };
        let payloads = match example {
            Example::Pricer => PRICER,
            Example::Pi => PI,
        };
        COMMON.iter().chain(base).chain(task).chain(payloads)
    }
}

/// Run `kwq new`.
pub(super) fn new(args: NewArgs) -> Result<(), CliError> {
    check_name(&args.name)?;
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(CliError::usage(format!(
            "{} already exists and is not empty",
            dir.display()
        )));
    }
    let manifest = Manifest {
        name: args.name.clone(),
        lang: args.lang,
    };
    let manifest_text = toml::to_string(&manifest).expect("a manifest serialises");
    let write = |path: &str, text: &str| -> Result<(), CliError> {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| CliError::usage(format!("cannot create {}: {e}", parent.display())))?;
        }
        std::fs::write(&target, text)
            .map_err(|e| CliError::usage(format!("cannot write {}: {e}", target.display())))
    };
    write(
        "kwq.toml",
        &format!("# Written by `kwq new`; read by `kwq build`.\n{manifest_text}"),
    )?;
    for file in args.lang.files(args.example) {
        let text = file
            .text
            .replace("{{name}}", &args.name)
            .replace("{{description}}", args.example.description())
            .replace("{{wit_bindgen}}", WIT_BINDGEN_VERSION);
        write(file.path, &text)?;
    }
    eprintln!(
        "created {} ({}); next: kwq build {}",
        dir.display(),
        args.lang.display_name(),
        dir.display()
    );
    Ok(())
}

/// A module name that is also a valid crate, npm package and file name.
fn check_name(name: &str) -> Result<(), CliError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if first_ok && rest_ok && name.len() <= 64 && !name.ends_with('-') {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "invalid name {name:?}: use lowercase letters, digits and '-', starting with a letter"
        )))
    }
}

/// Run `kwq build`: the language's tool, then `dist/NAME.wasm`.
pub(super) fn build(args: BuildArgs) -> Result<(), CliError> {
    let output = build_project(&args.dir)?;
    let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    // The output is dist/NAME.wasm: its stem is the module's name.
    let name = output.file_stem().unwrap_or_default().to_string_lossy();
    eprintln!(
        "built {} ({:.1} MB); next: kwq module push {} --name {name}",
        output.display(),
        size as f64 / 1e6,
        output.display(),
    );
    Ok(())
}

/// Build the project in `dir`; the path of the module it wrote.
pub(super) fn build_project(dir: &Path) -> Result<PathBuf, CliError> {
    let manifest = read_manifest(dir)?;
    let dist = dir.join("dist");
    std::fs::create_dir_all(&dist)
        .map_err(|e| CliError::usage(format!("cannot create {}: {e}", dist.display())))?;
    let out_name = format!("{}.wasm", manifest.name);
    let output = dist.join(&out_name);
    let out_arg = format!("dist/{out_name}");
    match manifest.lang {
        Lang::Rust => {
            let cargo = find_tool("cargo", "KWQ_CARGO", dir).ok_or_else(|| {
                CliError::usage("cargo not found: install Rust from https://rustup.rs")
            })?;
            check_rust_target(&cargo)?;
            run_tool(
                Command::new(&cargo)
                    .args(["build", "--release", "--target", "wasm32-wasip2"])
                    .args(["--target-dir", "target"])
                    .current_dir(dir),
                "cargo build",
            )?;
            let built = dir
                .join("target/wasm32-wasip2/release")
                .join(format!("{}.wasm", manifest.name.replace('-', "_")));
            std::fs::copy(&built, &output).map_err(|e| {
                CliError::failed(format!("cargo built no {}: {e}", built.display()))
            })?;
        }
        Lang::Python => {
            let tool = find_tool("componentize-py", "KWQ_COMPONENTIZE_PY", dir).ok_or_else(|| {
                CliError::usage(format!(
                    "componentize-py not found: install it with `pip install {COMPONENTIZE_PY}` (or set KWQ_COMPONENTIZE_PY)"
                ))
            })?;
            run_tool(
                Command::new(tool)
                    .args(["-d", "wit", "-w", "kwq-task", "componentize", "app"])
                    .args(["-p", ".", "-o", &out_arg])
                    .current_dir(dir),
                "componentize-py",
            )?;
        }
        Lang::Js => {
            let tool = find_tool("componentize-js", "KWQ_COMPONENTIZE_JS", dir).ok_or_else(|| {
                CliError::usage(format!(
                    "componentize-js not found: install it with `npm install -g {COMPONENTIZE_JS}` (or set KWQ_COMPONENTIZE_JS)"
                ))
            })?;
            run_tool(
                Command::new(tool)
                    .args(["kwq-task/entry.js", "--wit", "wit", "-n", "kwq-task"])
                    .args(["-o", &out_arg])
                    .current_dir(dir),
                "componentize-js",
            )?;
        }
    }
    if !output.is_file() {
        return Err(CliError::failed(format!(
            "the build wrote no {}",
            output.display()
        )));
    }
    Ok(output)
}

fn read_manifest(dir: &Path) -> Result<Manifest, CliError> {
    let path = dir.join("kwq.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        CliError::usage(format!(
            "cannot read {} ({e}): is this a project made by `kwq new`?",
            path.display()
        ))
    })?;
    toml::from_str(&text)
        .map_err(|e| CliError::usage(format!("{}: {}", path.display(), e.message())))
}

/// The tool's path: `$ENV_VAR` if set, else the project's
/// `node_modules/.bin`, else `PATH`.
fn find_tool(name: &str, env_var: &str, dir: &Path) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let local = dir.join("node_modules/.bin").join(name);
    if local.is_file() {
        return Some(local);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|p| p.join(name))
        .find(|p| p.is_file())
}

/// A clear line when the Wasm target is missing, before cargo says it less clearly.
fn check_rust_target(cargo: &Path) -> Result<(), CliError> {
    let rustc = cargo.with_file_name("rustc");
    let rustc = if rustc.is_file() {
        rustc
    } else {
        PathBuf::from("rustc")
    };
    let libdir = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match libdir {
        Some(dir) if dir.is_dir() => Ok(()),
        _ => Err(CliError::usage(
            "the Rust target wasm32-wasip2 is not installed: rustup target add wasm32-wasip2",
        )),
    }
}

/// Run a build tool with its output shown on stderr (stdout is kept for
/// results: `kwq dev` prints them there); a failure names the tool.
fn run_tool(command: &mut Command, what: &str) -> Result<(), CliError> {
    let status = command
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| CliError::usage(format!("cannot run {what}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "{what} failed ({status}); its output is above"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_crate_names_are_refused() {
        for bad in ["", "Pricer", "9lives", "a_b", "a b", "trailing-", "../x"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["pricer", "mc-pi", "a1"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn the_vendored_rust_sdk_asks_for_the_workspace_wit_bindgen() {
        let workspace = include_str!("../../../Cargo.toml");
        assert!(
            workspace.contains(&format!(
                "wit-bindgen = {{ version = \"{WIT_BINDGEN_VERSION}\""
            )),
            "Cargo.toml's wit-bindgen is not {WIT_BINDGEN_VERSION}: update WIT_BINDGEN_VERSION"
        );
    }
}
