//! `cargo xtask dist [DIR]`: writes what the .deb and .rpm install beside the binary,
//! generated from the sources each time (never committed, so it cannot drift):
//!
//! - `DIR/man/tokend.1` and `tokend-SUBCOMMAND.1`: clap_mangen from `tokend::cli`, and
//!   `docker-credential-tokend.1` (`tokend credential docker` under the name the container
//!   tools run it by);
//! - `DIR/man/tokend.toml.5`: the book's configuration chapter
//!   (`docs/src/configuration.md`) turned into a man page by [`roff`];
//! - `DIR/man-gz/`: the same pages gzipped (no name, no time: the same bytes each run),
//!   for the .rpm (cargo-deb compresses the .deb's itself);
//! - `DIR/completions/tokend.bash`, `_tokend`, `tokend.fish`: clap_complete's dynamic
//!   registration scripts. They ask `tokend` itself at each TAB (`TOKEND_COMPLETE`), so
//!   subcommands, options and the config's account names come from the installed binary.
//!
//! - `TARGET/release/docker-credential-tokend`: a symbolic link to `tokend` beside the
//!   binary, which the .deb installs as it is (tokend called by that name is the container
//!   tools' credential helper; the .rpm's `%post` makes the link instead).
//!
//! DIR defaults to `TARGET/release/dist` (TARGET: `CARGO_TARGET_DIR`, else `target/`),
//! where the packages' asset lists look (`target/release/` is cargo-deb's and
//! cargo-generate-rpm's name for the real target directory). The output depends on the
//! sources alone: no date, no path of this machine.

mod roff;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory as _;
use clap_complete::env::EnvCompleter;

/// What the man pages' footer and the completion scripts name.
const BIN: &str = "tokend";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("dist") if args.len() <= 2 => dist(args.get(1).map(PathBuf::from)),
        _ => Err("usage: cargo xtask dist [DIR]".to_owned()),
    };
    match result {
        Ok(dir) => {
            println!("{}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ lies in the workspace")
        .to_path_buf()
}

fn dist(dir: Option<PathBuf>) -> Result<PathBuf, String> {
    let root = workspace();
    let release = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"))
        .join("release");
    let dir = dir.unwrap_or_else(|| release.join("dist"));
    helper_link(&release)?;
    let man = dir.join("man");
    let man_gz = dir.join("man-gz");
    let completions = dir.join("completions");
    for d in [&man, &man_gz, &completions] {
        // Anew each time: a subcommand that went away leaves no page behind.
        if d.exists() {
            std::fs::remove_dir_all(d)
                .map_err(|e| format!("failed to clear {}: {e}", d.display()))?;
        }
        std::fs::create_dir_all(d).map_err(|e| format!("failed to create {}: {e}", d.display()))?;
    }
    man_pages(&man)?;
    let chapter = root.join("docs/src/configuration.md");
    let text = std::fs::read_to_string(&chapter)
        .map_err(|e| format!("failed to read {}: {e}", chapter.display()))?;
    write(
        &man.join("tokend.toml.5"),
        &roff::config_page(&text, &version()),
    )?;
    gzip_all(&man, &man_gz)?;
    completion_scripts(&completions)?;
    Ok(dir)
}

/// `RELEASE/docker-credential-tokend -> tokend`, made anew (a link, relative: installed
/// beside `/usr/bin/tokend` it points at it).
fn helper_link(release: &Path) -> Result<(), String> {
    let link = release.join(tokend::cli::DOCKER_HELPER);
    std::fs::create_dir_all(release)
        .map_err(|e| format!("failed to create {}: {e}", release.display()))?;
    match std::fs::remove_file(&link) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("failed to remove {}: {e}", link.display()))
        }
        _ => {}
    }
    std::os::unix::fs::symlink(BIN, &link)
        .map_err(|e| format!("failed to link {} to {BIN}: {e}", link.display()))
}

/// tokend's version (not this crate's).
fn version() -> String {
    tokend::cli::Cli::command()
        .get_version()
        .expect("the command line has a version")
        .to_owned()
}

fn write(path: &Path, content: &str) -> Result<(), String> {
    std::fs::write(path, content).map_err(|e| format!("failed to write {}: {e}", path.display()))
}

/// Every file of `from`, gzipped into `to` as NAME.gz.
fn gzip_all(from: &Path, to: &Path) -> Result<(), String> {
    use std::io::Write as _;
    let mut names: Vec<_> = std::fs::read_dir(from)
        .map_err(|e| format!("failed to list {}: {e}", from.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("failed to list {}: {e}", from.display()))?;
    names.sort();
    for name in names {
        let data = std::fs::read(from.join(&name))
            .map_err(|e| format!("failed to read {}: {e}", from.join(&name).display()))?;
        // No file name and a zero time in the header: reproducible.
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::best());
        gz.write_all(&data).map_err(|e| e.to_string())?;
        let out = gz.finish().map_err(|e| e.to_string())?;
        let mut file_name = name.clone();
        file_name.push(".gz");
        std::fs::write(to.join(&file_name), out)
            .map_err(|e| format!("failed to write {}: {e}", to.join(&file_name).display()))?;
    }
    Ok(())
}

/// `tokend.1` and one page per subcommand, each with a SEE ALSO section.
fn man_pages(dir: &Path) -> Result<(), String> {
    let mut cmd = tokend::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| format!("{BIN}-{}", s.get_name()))
        .collect();
    let page = |cmd: clap::Command, see_also: Vec<String>| -> Result<(), String> {
        let man = clap_mangen::Man::new(cmd)
            .manual("tokend manual")
            .source(format!("tokend {}", version()));
        let mut out = Vec::new();
        man.render(&mut out).map_err(|e| e.to_string())?;
        let mut text = String::from_utf8(out).map_err(|e| e.to_string())?;
        text.push_str(".SH \"SEE ALSO\"\n");
        text.push_str(&see_also.join(",\n"));
        text.push('\n');
        write(&dir.join(man.get_filename()), &text)
    };
    let mut all: Vec<String> = subcommands
        .iter()
        .map(|s| format!("\\fB{s}\\fR(1)"))
        .collect();
    let helper = tokend::cli::DOCKER_HELPER;
    all.push(format!("\\fB{helper}\\fR(1)"));
    all.push("\\fBtokend.toml\\fR(5)".to_owned());
    // Built, each subcommand is named `tokend-NAME` (the page's title and file name)
    // and used as `tokend NAME` (its synopsis).
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let see = vec![
            format!("\\fB{BIN}\\fR(1)"),
            "\\fBtokend.toml\\fR(5)".to_owned(),
        ];
        page(sub.clone(), see)?;
    }
    // The same binary by another name (a link the packages install): a page of its own.
    let docker = cmd
        .find_subcommand("credential")
        .and_then(|c| c.find_subcommand("docker"))
        .ok_or("no `tokend credential docker` in the command line")?
        .clone()
        .name(helper)
        .display_name(helper)
        .bin_name(helper);
    page(
        docker,
        vec![
            format!("\\fB{BIN}-credential\\fR(1)"),
            format!("\\fB{BIN}\\fR(1)"),
            "\\fBtokend.toml\\fR(5)".to_owned(),
        ],
    )?;
    page(cmd.clone(), all)
}

/// The registration scripts of bash, zsh and fish, calling `tokend` from `PATH`.
fn completion_scripts(dir: &Path) -> Result<(), String> {
    let var = tokend::completion::VAR;
    let register = |shell: &dyn EnvCompleter| -> Result<String, String> {
        let mut buf = Vec::new();
        shell
            .write_registration(var, BIN, BIN, BIN, &mut buf)
            .map_err(|e| e.to_string())?;
        String::from_utf8(buf).map_err(|e| e.to_string())
    };
    let header = |comment: &str| {
        format!(
            "{comment} Completion for tokend {}: generated by `cargo xtask dist` (clap_complete);\n\
             {comment} each TAB asks `tokend` itself, through {var}.\n",
            version()
        )
    };
    write(
        &dir.join("tokend.bash"),
        &format!("{}{}", header("#"), register(&clap_complete::env::Bash)?),
    )?;
    write(
        &dir.join("tokend.fish"),
        &format!("{}{}", header("#"), register(&clap_complete::env::Fish)?),
    )?;
    // zsh reads `#compdef` from the first line. clap_complete's script only registers its
    // function (`compdef`), fit for `source`; autoloaded from fpath (where packages put
    // it), the file's body runs at the first TAB and must complete there too.
    let zsh = register(&clap_complete::env::Zsh)?;
    let (first, rest) = zsh.split_once('\n').ok_or("an empty zsh script")?;
    let register_line = format!("compdef _clap_dynamic_completer_{BIN} {BIN}");
    if !rest.contains(&register_line) {
        return Err(format!(
            "the zsh script no longer ends in {register_line:?}"
        ));
    }
    let rest = rest.replace(
        &register_line,
        &format!(
            "if [[ \"${{zsh_eval_context[-1]}}\" == loadautofunc ]]; then\n    \
             _clap_dynamic_completer_{BIN} \"$@\"\nelse\n    {register_line}\nfi"
        ),
    );
    write(
        &dir.join("_tokend"),
        &format!("{first}\n{}{rest}", header("#")),
    )
}
