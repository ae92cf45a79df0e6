//! Raw config -> typed [`Config`]: the text parsed and every section validated, every
//! error collected with its line, column and key, and all of them returned together.
//!
//! Pure: nothing here reads a file or asks the system. The user, group and host names a
//! config may use come from a [`Host`] handed in (`files::System` asks the system; a test
//! answers itself), and the checks that look at files run afterwards, in `files`, on what
//! [`Located`] records.
//!
//! One file per part: `recover` (the TOML text into raw sections: syntax errors, unknown
//! keys with a did-you-mean, type errors, line and column), `values` (durations, choices,
//! modes, secrets, users and groups, as every section writes them), `daemon`, `cluster`,
//! `account`, `auth` (client authentication, private_key_jwt, client certificates, the
//! grant), `credential` (what the credential helpers read: `urls`, `credential_username`),
//! `binding` (`token_binding`, DPoP)
//! and `output`. This file holds the walk over the whole file and what holds
//! across accounts (names, state_dir, output paths).

/// An account's key as written, or else as `[defaults]` has it.
macro_rules! pick {
    ($a:expr, $d:expr, $f:ident) => {
        $a.$f.clone().or_else(|| $d.$f.clone())
    };
}

mod account;
mod auth;
mod binding;
mod cluster;
mod credential;
mod daemon;
mod output;
mod recover;
mod values;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::raw::RawAccount;
use super::secret::SecretSpec;
use super::{
    Account, AssertionAlg, Config, ConfigError, ConfigErrors, DaemonConfig, Options, TokenUrl,
};
use recover::Lines;

pub use account::is_loopback;
pub use cluster::{parse_hex_key, ClusterKeyError};
pub use credential::DEFAULT_CREDENTIAL_USERNAME;
pub(crate) use output::normalized;

/// What the parse asks of the machine it runs on: the ids of the users and groups a
/// config names (`access`, an output's `owner` and `group`) and the host's name (the
/// default cluster `member`). `files::System` asks the system.
pub(crate) trait Host {
    fn uid(&self, user: &str) -> Option<u32>;
    fn gid(&self, group: &str) -> Option<u32>;
    fn hostname(&self) -> Option<String>;
}

/// Where the keys that the file checks (`files::check_files`) report on are written.
pub(super) struct Located {
    /// Every inline credential (SPEC §2).
    pub(super) inline_secrets: Vec<ConfigError>,
    /// `daemon.state_dir`, if set.
    pub(super) state_dir: Option<ConfigError>,
    /// Every private key and client certificate, with where it is written.
    pub(super) key_files: Vec<KeyFile>,
    /// Every output's path, with where it is written.
    pub(super) outputs: Vec<(PathBuf, ConfigError)>,
}

/// A `private_key`, `client_key` or `client_cert`, for the checks that read it.
pub(super) struct KeyFile {
    pub(super) spec: SecretSpec,
    /// Where it is written (the message left empty).
    pub(super) at: ConfigError,
    pub(super) what: KeyUse,
}

pub(super) enum KeyUse {
    /// Signs client assertions with this algorithm (None: the key's default).
    Assertion {
        alg: Option<AssertionAlg>,
        alg_at: Option<ConfigError>,
    },
    /// The key of a client certificate.
    ClientKey,
    /// A client certificate, and the key that goes with it.
    ClientCert { key: SecretSpec },
    /// A DPoP key (`dpop_key`) for this algorithm.
    Dpop { alg: super::DpopAlg },
}

/// Parses and validates config text; `file` names the file in errors and anchors
/// relative paths, `host` answers the names it uses. Returns the config and where its
/// keys that name files are, for `files::check_files`.
pub(super) fn parse(
    text: &str,
    file: &Path,
    host: &dyn Host,
) -> Result<(Config, Located), ConfigErrors> {
    let mut cx = Ctx::new(text, file, host);
    let Some(raw) = recover::sections(&mut cx) else {
        // Syntax errors, in the order the TOML parser found them.
        return Err(ConfigErrors(cx.errors));
    };
    let state_dir_at = raw
        .daemon
        .state_dir
        .as_ref()
        .map(|s| cx.locate(s.span(), "daemon.state_dir", String::new()));
    let daemon = daemon::daemon(&mut cx, raw.daemon);
    let cluster = raw.cluster.and_then(|c| cluster::cluster(&mut cx, c));
    account::defaults(&mut cx, &raw.defaults);
    credential::defaults(&mut cx, &raw.defaults);
    let accounts = accounts(&mut cx, raw.accounts, &raw.defaults, &daemon);
    if !cx.errors.is_empty() {
        cx.errors.sort_by_key(|e| (e.line, e.column));
        return Err(ConfigErrors(cx.errors));
    }
    let config = Config {
        path: file.to_owned(),
        daemon,
        accounts: accounts
            .into_iter()
            .map(|a| Account {
                cluster: a.cluster && cluster.is_some(),
                ..a
            })
            .collect(),
        cluster,
    };
    let located = Located {
        inline_secrets: cx.inline_secrets,
        state_dir: state_dir_at,
        key_files: cx.key_files,
        outputs: cx.outputs,
    };
    Ok((config, located))
}

/// Validates every `[[account]]`, and what holds across them: each name used once, a
/// refresh_token account only with a `state_dir`, and no two outputs (nor one and the
/// `state_dir`) spelled as one file.
fn accounts(
    cx: &mut Ctx<'_>,
    raw: Vec<recover::RawEntry>,
    defaults: &RawAccount,
    daemon: &DaemonConfig,
) -> Vec<Account> {
    let mut accounts = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut paths = output::Spelled::new(daemon.state_dir.as_deref());
    for (label, raw, span) in raw {
        let path_spans = output::path_spans(&raw);
        let grant_at = raw
            .grant_type
            .as_ref()
            .or(defaults.grant_type.as_ref())
            .map_or(span.clone(), |g| g.span());
        let binding_at = raw
            .token_binding
            .as_ref()
            .or(defaults.token_binding.as_ref())
            .map_or(span.clone(), |g| g.span());
        let has_socket = daemon.socket.is_some();
        let Some(a) = account::account(cx, &label, raw, defaults, span.clone(), has_socket) else {
            continue;
        };
        if let Some(line) = names.get(&a.name) {
            cx.err(
                span,
                label,
                format!(
                    "the name {:?} is already used by the account on line {line}",
                    a.name
                ),
            );
            continue;
        }
        names.insert(a.name.clone(), cx.lines.line_col(cx.text, span.start).0);
        if a.rotates() && daemon.state_dir.is_none() {
            cx.err(
                grant_at,
                format!("{label}.grant_type"),
                "grant_type = \"refresh_token\" needs [daemon] state_dir: the provider rotates the refresh token, and the rotated one must survive a restart (the configured one is spent after the first refresh)",
            );
        }
        if a.dpop.as_ref().is_some_and(|d| d.key.is_none()) && daemon.state_dir.is_none() {
            cx.err(
                binding_at,
                format!("{label}.token_binding"),
                "token_binding = \"dpop\" without dpop_key needs [daemon] state_dir: tokend makes the key once and keeps it there, so that a restart keeps the tokens already bound to it",
            );
        }
        paths.check(cx, &label, &a, path_spans);
        accounts.push(a);
    }
    accounts
}

/// The parse's state: the text, and everything found so far.
struct Ctx<'a> {
    text: &'a str,
    lines: Lines,
    file: &'a Path,
    base: PathBuf,
    host: &'a dyn Host,
    errors: Vec<ConfigError>,
    inline_secrets: Vec<ConfigError>,
    /// Keys whose values were dropped for a type error: not reported again as missing.
    dropped: Vec<String>,
    key_files: Vec<KeyFile>,
    /// Every output's path, and where it is written.
    outputs: Vec<(PathBuf, ConfigError)>,
    /// Every token endpoint once: accounts of one provider share it (issue #11).
    token_urls: HashSet<Arc<TokenUrl>>,
    /// Every distinct [`Options`] once, likewise.
    options: HashSet<Arc<Options>>,
}

impl<'a> Ctx<'a> {
    fn new(text: &'a str, file: &'a Path, host: &'a dyn Host) -> Self {
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        Ctx {
            text,
            lines: Lines::new(text),
            file,
            base,
            host,
            errors: Vec::new(),
            inline_secrets: Vec::new(),
            dropped: Vec::new(),
            key_files: Vec::new(),
            outputs: Vec::new(),
            token_urls: Default::default(),
            options: Default::default(),
        }
    }
}

impl Ctx<'_> {
    fn err(&mut self, span: Range<usize>, key: impl Into<String>, msg: impl Into<String>) {
        let e = self.locate(span, key.into(), msg.into());
        self.errors.push(e);
    }

    fn locate(&self, span: Range<usize>, key: impl Into<String>, message: String) -> ConfigError {
        let (line, column) = self.lines.line_col(self.text, span.start);
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message,
        }
    }

    /// A required key is absent (unless it was dropped for a type error, already reported).
    fn missing(&mut self, span: Range<usize>, label: &str, key: &str, hint: &str) {
        if !self.dropped.iter().any(|d| d == &format!("{label}.{key}")) {
            self.err(span, label, format!("missing key {key:?}{hint}"));
        }
    }

    /// A path as written, relative to the config file's directory.
    fn path(&self, p: &str) -> PathBuf {
        self.base.join(p)
    }
}

/// `value`, or the equal one an earlier account has, from `known`.
fn share<T: Eq + std::hash::Hash>(
    known: &mut std::collections::HashSet<Arc<T>>,
    value: T,
) -> Arc<T> {
    if let Some(k) = known.get(&value) {
        return k.clone();
    }
    let new = Arc::new(value);
    known.insert(new.clone());
    new
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What one `[[account]]` is validated with: its raw keys, the `[defaults]`, where it
/// is (for errors about a missing key) and its label (`account.msk`) for key paths.
struct At<'r> {
    a: &'r RawAccount,
    d: &'r RawAccount,
    label: &'r str,
    span: Range<usize>,
}

impl At<'_> {
    /// The key path of `key` in this account (`account.msk.scope`).
    fn k<'k>(&'k self, key: &'k str) -> Key<'k> {
        Key::new(self.label, key)
    }
}

/// A key's path (`account.msk.scope`) as its two parts, made into one string only when
/// an error or a located key needs it: a value that is fine costs no allocation (with
/// 10,000 accounts, a dozen keys each, on every reload).
#[derive(Clone, Copy)]
pub(super) struct Key<'k> {
    /// The section's label (`account.msk`); empty for a key written whole.
    label: &'k str,
    key: &'k str,
}

impl<'k> Key<'k> {
    fn new(label: &'k str, key: &'k str) -> Self {
        Key { label, key }
    }
}

impl<'k> From<&'k str> for Key<'k> {
    fn from(key: &'k str) -> Self {
        Key { label: "", key }
    }
}

impl std::fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.label.is_empty() {
            f.write_str(self.key)
        } else {
            write!(f, "{}.{}", self.label, self.key)
        }
    }
}

impl From<Key<'_>> for String {
    fn from(key: Key<'_>) -> String {
        key.to_string()
    }
}

#[cfg(test)]
pub mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{
        parse_str, AssertionAlg, ClientAuth, Format, Grant, SchedulePolicy, Secret, TokenUrl,
    };

    pub(crate) fn parse(text: &str) -> Result<Config, ConfigErrors> {
        parse_str(text, Path::new("/etc/tokend/config.toml"))
    }

    pub(crate) fn errors(text: &str) -> Vec<ConfigError> {
        parse(text).unwrap_err().0
    }

    pub(crate) const MINIMAL: &str = r#"
[[account]]
name = "msk"
token_url = "https://idp.example/token"
client_id = "id"
client_secret = { file = "secrets/msk" }

[[account.output]]
path = "/run/tokend/tokens/msk"
"#;

    pub(crate) const REF_SECRET: &str =
        "[[account]]\nname = \"a\"\ntoken_url = \"https://idp.example/t\"\n\
                              client_id = \"id\"\nclient_secret = { env = \"S\" }\n";

    pub(crate) const KEYED: &str =
        "[[account]]\nname = \"k\"\nfhir_base = \"https://ehr.example/fhir/R4\"\n\
                         client_id = \"id\"\nclient_auth = \"private_key_jwt\"\n\
                         private_key = { file = \"key.pem\" }\n";
    pub(crate) const OUT: &str = "[[account.output]]\npath = \"/x\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        let a = &c.accounts[0];
        assert_eq!(a.name, "msk");
        assert_eq!(a.grant, Grant::ClientCredentials);
        assert_eq!(a.client_auth, ClientAuth::Basic);
        assert_eq!(
            a.client_secret,
            Some(SecretSpec::File("/etc/tokend/secrets/msk".into()))
        );
        assert_eq!(a.outputs[0].mode, 0o600);
        assert_eq!(a.outputs[0].format, Format::Raw);
        assert_eq!(a.options.schedule, SchedulePolicy::default());
        assert_eq!(a.options.timeout, Duration::from_secs(30));
        assert_eq!(c.daemon, DaemonConfig::default());
    }

    #[test]
    fn every_error_is_reported() {
        let text = r#"
[daemon]
log_format = "xml"
bogus = 1

[[account]]
name = "a"
token_url = "https://idp.example/token"
client_id = "id"
client_secret = "s"
refresh_every = "soon"
scoop = "x"

[[account.output]]
path = "/tmp/a"
mode = 640
colour = "red"

[[account]]
name = "b b"
token_url = "ftp://x"
client_id = "id"
client_auth = "none"
grant_type = "password"
"#;
        let errs = errors(text);
        let got: Vec<_> = errs
            .iter()
            .map(|e| (e.line, e.column, e.key.as_str()))
            .collect();
        for want in [
            (3, 14, "daemon.log_format"),
            (4, 1, "daemon.bogus"),
            (11, 17, "account.a.refresh_every"),
            (12, 1, "account.a.scoop"),
            (16, 8, "account.a.output[1].mode"),
            (17, 1, "account.a.output[1].colour"),
            (20, 8, "account.b b.name"),
            (21, 13, "account.b b.token_url"),
        ] {
            assert!(got.contains(&want), "missing {want:?} in {got:#?}");
        }
        assert!(errs
            .iter()
            .any(|e| e.message.contains("needs \"username\"")));
        let mode = errs.iter().find(|e| e.key.ends_with("mode")).unwrap();
        assert!(
            mode.message.contains("\"0640\" or 0o640"),
            "{}",
            mode.message
        );
    }

    #[test]
    fn defaults_are_inherited_and_overridden() {
        let text = format!(
            "[defaults]\nrefresh_every = \"25m\"\ntimeout = \"5s\"\n{}\ntimeout = \"9s\"\n",
            MINIMAL.replace(
                "[[account.output]]\npath = \"/run/tokend/tokens/msk\"\n",
                ""
            )
        ) + "[[account.output]]\npath = \"/x\"\n";
        let c = parse(&text).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            a.options.schedule.refresh_every,
            Some(Duration::from_secs(25 * 60))
        );
        assert_eq!(a.options.timeout, Duration::from_secs(9));
    }

    #[test]
    fn duplicate_names_and_output_paths_are_refused() {
        let text = format!("{MINIMAL}\n{MINIMAL}");
        let errs = errors(&text);
        assert!(
            errs.iter()
                .any(|e| e.message.contains("already used by the account on line 2")),
            "{errs:#?}"
        );
        let text = format!("{MINIMAL}\n{}", MINIMAL.replace("\"msk\"", "\"other\""));
        let errs = errors(&text);
        let dup = errs
            .iter()
            .find(|e| e.message.contains("already the output of account \"msk\""))
            .unwrap_or_else(|| panic!("{errs:#?}"));
        // The second account's output path, where it is written, and the first's line.
        let line = MINIMAL.lines().count()
            + 1
            + MINIMAL.lines().position(|l| l.starts_with("path")).unwrap()
            + 1;
        assert_eq!((dup.line, dup.column), (line, 8), "{dup}");
        assert_eq!(dup.key, "account.other.output[1].path");
        let first = MINIMAL.lines().position(|l| l.starts_with("path")).unwrap() + 1;
        assert!(
            dup.message.ends_with(&format!("\"msk\" (line {first})")),
            "{dup}"
        );
    }

    #[test]
    fn a_refresh_token_account_needs_a_state_dir() {
        let rt = "[[account]]\nname = \"rt\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
                  client_auth = \"none\"\ngrant_type = \"refresh_token\"\nrefresh_token = { env = \"RT\" }\n\
                  [[account.output]]\npath = \"/r\"\n";
        let errs = errors(rt);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].key, "account.rt.grant_type");
        assert_eq!((errs[0].line, errs[0].column), (6, 14));
        assert!(
            errs[0].message.contains("needs [daemon] state_dir"),
            "{}",
            errs[0]
        );
        // Inherited from [defaults], it is named where the account is.
        let inherited = format!(
            "[defaults]\ngrant_type = \"refresh_token\"\n{}",
            rt.replace("grant_type = \"refresh_token\"\n", "")
        );
        assert_eq!(errors(&inherited)[0].key, "account.rt.grant_type");
        assert!(parse(&format!("[daemon]\nstate_dir = \"/s\"\n{rt}")).is_ok());
    }

    #[test]
    fn debug_of_an_account_shows_no_secret() {
        let text = MINIMAL.replace(
            "client_id = \"id\"",
            "client_id = \"id\"\nproxy = \"http://u:proxy-pass@proxy:3128\"\nextra_headers = { \"X-Api-Key\" = \"api-key-value\" }\nclient_secret_unused = 1",
        )
        .replace("client_secret_unused = 1\n", "")
        .replace("{ file = \"secrets/msk\" }", "\"inline-secret\"");
        let text = "[daemon]\nstate_dir = \"/s\"\n".to_owned()
            + &text.replace("https://", "https://url-user:url-pass@")
            + "\n[[account]]\nname = \"pw\"\ntoken_url = \"https://idp.example/t\"\n\
               client_id = \"id\"\nclient_secret = \"inline-secret\"\ngrant_type = \"password\"\n\
               username = \"u\"\npassword = \"inline-password\"\n[[account.output]]\npath = \"/p\"\n\
               [[account]]\nname = \"rt\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
               client_auth = \"none\"\ngrant_type = \"refresh_token\"\nrefresh_token = \"inline-rt\"\n\
               [[account.output]]\npath = \"/r\"\n";
        let c = parse(&text).unwrap();
        let dbg = format!("{c:?}");
        let secrets = [
            "proxy-pass",
            "api-key-value",
            "inline-secret",
            "url-pass",
            "inline-password",
            "inline-rt",
        ];
        for s in secrets {
            assert!(!dbg.contains(s), "{s} in {dbg}");
        }
        // Every type that holds one: the account, its grant, its secret specs, the
        // credentials read for a request, the request built from them.
        let creds = crate::oauth::request::Credentials {
            client_secret: Some(Secret::new("inline-secret")),
            password: Some(Secret::new("inline-password")),
            refresh_token: Some(Secret::new("inline-rt")),
            ..Default::default()
        };
        for a in &c.accounts {
            let req = crate::oauth::request::build(a, a.token_url.configured(), &creds);
            let all = format!("{a:?} {:?} {:?} {creds:?} {req:?}", a.grant, a.secrets());
            for s in secrets {
                assert!(!all.contains(s), "{s} in {all}");
            }
        }
        assert_eq!(
            c.accounts[0].options.extra_headers["X-Api-Key"].expose(),
            "api-key-value"
        );
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../config.example.toml");
        let c = parse_str(text, Path::new("config.example.toml")).unwrap();
        assert_eq!(c.accounts.len(), 2);
        let msk = &c.accounts[0];
        assert_eq!(
            (msk.name.as_str(), msk.client_auth),
            ("msk", ClientAuth::Post)
        );
        assert_eq!(msk.scope.as_deref(), Some("full"));
        let cib = &c.accounts[1];
        assert!(matches!(cib.grant, Grant::Password { .. }));
        assert_eq!(cib.client_auth, ClientAuth::Basic);
        assert_eq!(
            cib.options.schedule.refresh_every,
            Some(Duration::from_secs(25 * 60))
        );
        // The commented SMART Backend Services account parses once uncommented.
        let uncommented = |marker: &str| -> String {
            text.split(marker)
                .nth(1)
                .expect("the example has the account")
                .split("\n\n")
                .next()
                .expect("a section")
                .lines()
                .map(|l| l.strip_prefix('#').unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let ehr: String = text
            .split("#[[account]]\n#name = \"ehr\"")
            .nth(1)
            .expect("the example has the SMART account")
            .split("\n\n# A FHIR API")
            .next()
            .expect("a section")
            .lines()
            .map(|l| l.strip_prefix('#').unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse_str(
            &format!("[[account]]\nname = \"ehr\"{ehr}"),
            Path::new("config.example.toml"),
        )
        .unwrap();
        let ehr = &c.accounts[0];
        assert_eq!(ehr.client_auth, ClientAuth::PrivateKeyJwt);
        assert!(matches!(*ehr.token_url, TokenUrl::FhirBase(_)));
        assert_eq!(
            ehr.assertion.as_ref().unwrap().alg,
            Some(AssertionAlg::Rs384)
        );
        // And the commented DPoP account, with the daemon's socket and state_dir.
        let fhir = uncommented("#[[account]]\n#name = \"fhir\"");
        let c = parse_str(
            &format!(
                "[daemon]\nsocket = \"/run/t.sock\"\nstate_dir = \"/var/lib/tokend\"\n\
                 [[account]]\nname = \"fhir\"{fhir}"
            ),
            Path::new("config.example.toml"),
        )
        .unwrap();
        assert!(c.accounts[0].dpop.is_some());
    }

    #[test]
    fn accounts_share_equal_token_urls_and_options() {
        let acct = |name: &str, url: &str, extra: &str| {
            format!(
                "[[account]]\nname = \"{name}\"\ntoken_url = \"{url}\"\nclient_id = \"{name}\"\n\
                 client_secret = {{ env = \"S\" }}\n{extra}\n[[account.output]]\npath = \"/x/{name}\"\n"
            )
        };
        let text = [
            "[defaults]\ntimeout = \"10s\"\n".to_owned(),
            acct("a", "https://idp.example/t", ""),
            acct("b", "https://idp.example/t", "scope = \"other\""),
            acct("c", "https://other.example/t", "refresh_every = \"5m\""),
            acct("d", "https://other.example/t", "timeout = \"10s\""),
        ]
        .concat();
        let c = parse(&text).unwrap();
        let [a, b, cc, d] = &c.accounts[..] else {
            panic!("four accounts")
        };
        assert!(Arc::ptr_eq(&a.token_url, &b.token_url));
        assert!(Arc::ptr_eq(&cc.token_url, &d.token_url));
        assert!(!Arc::ptr_eq(&a.token_url, &cc.token_url));
        assert_eq!(a.options.timeout, Duration::from_secs(10));
        assert!(
            Arc::ptr_eq(&a.options, &b.options),
            "equal settings: one copy"
        );
        assert!(
            Arc::ptr_eq(&a.options, &d.options),
            "the same value, set twice"
        );
        assert!(!Arc::ptr_eq(&a.options, &cc.options));
        assert_eq!(
            cc.options.schedule.refresh_every,
            Some(Duration::from_secs(300))
        );
        assert_eq!(a.options.schedule.refresh_every, None);
    }

    /// Answers names from a list, as no system would.
    struct Names;

    impl Host for Names {
        fn uid(&self, user: &str) -> Option<u32> {
            (user == "app").then_some(1234)
        }
        fn gid(&self, group: &str) -> Option<u32> {
            (group == "readers").then_some(4321)
        }
        fn hostname(&self) -> Option<String> {
            Some("node-7".into())
        }
    }

    #[test]
    fn the_names_a_config_uses_come_from_the_host_it_is_given() {
        let text = format!(
            "[cluster]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/t\"\nkey = \"{}\"\n\n\
             {REF_SECRET}access = {{ users = [\"app\"], groups = [\"readers\"] }}\n\
             [[account.output]]\npath = \"/x\"\nowner = \"app\"\ngroup = \"readers\"\n",
            "ab".repeat(32)
        );
        let (c, _) = super::parse(&text, Path::new("/c.toml"), &Names).unwrap();
        let a = &c.accounts[0];
        assert_eq!(
            (&a.options.access.users[..], &a.options.access.groups[..]),
            (&[1234][..], &[4321][..])
        );
        assert_eq!(
            (a.outputs[0].owner, a.outputs[0].group),
            (Some(1234), Some(4321))
        );
        assert_eq!(c.cluster.unwrap().member, "node-7");
        let other = text.replace("\"app\"]", "\"root\"]");
        let Err(ConfigErrors(errs)) = super::parse(&other, Path::new("/c.toml"), &Names) else {
            panic!("root is not among the names");
        };
        let e = &errs[0];
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            ("account.a.access.users", 11, 21),
            "{e}"
        );
        assert_eq!(e.message, "no user named \"root\" on this system");
    }
}
