//! `tokend once` against the fake IdP: what each grant x client auth x params_in x
//! basic_encoding puts on the wire, what every output format holds and with which mode,
//! and the exit codes (0 ok, 1 the provider said no, 2 usage or config error).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::support::fake_idp::{Expiry, FakeIdp, Reply};
use crate::support::{once, tokend, Sandbox, SHORT};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_grant_and_client_auth_sends_the_right_request() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let grants = [
        ("client_credentials", ""),
        (
            "password",
            "username = \"alice\"\npassword = \"pw-{name}\"\n",
        ),
        ("refresh_token", "refresh_token = \"rt-{name}\"\n"),
    ];
    let mut text = String::from("[daemon]\nstate_dir = \"state\"\n");
    let mut names = Vec::new();
    for (grant, grant_keys) in grants {
        for auth in ["basic", "post", "none"] {
            for params_in in ["body", "query"] {
                let name = format!("{grant}-{auth}-{params_in}");
                let secret = if auth == "none" {
                    String::new()
                } else {
                    format!("client_secret = \"secret-{name}\"\n")
                };
                text += &format!(
                    "[[account]]\nname = \"{name}\"\n\
                     token_url = \"http://{addr}/t/{name}?tenant=t1\"\n\
                     grant_type = \"{grant}\"\nclient_id = \"id-{name}\"\n{secret}\
                     client_auth = \"{auth}\"\nparams_in = \"{params_in}\"\n\
                     scope = \"read write\"\n\
                     extra_params = {{ audience = \"api://x\" }}\n\
                     extra_headers = {{ X-Tenant = \"t1\" }}\n{keys}\n\
                     [[account.output]]\npath = \"out/{name}\"\n\n",
                    addr = idp.addr(),
                    keys = grant_keys.replace("{name}", &name),
                );
                names.push((name, grant, auth, params_in));
            }
        }
    }
    let config = sandbox.config(&text);

    let run = once(&config, &[]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);

    let requests = idp.requests();
    assert_eq!(requests.len(), names.len(), "one request per account");
    for (name, grant, auth, params_in) in &names {
        let req = requests
            .iter()
            .find(|r| r.path() == format!("/t/{name}"))
            .unwrap_or_else(|| panic!("no request for {name}"));
        assert_eq!(req.method, "POST", "{name}");
        assert_eq!(req.header("accept"), Some("application/json"), "{name}");
        assert_eq!(req.header("x-tenant"), Some("t1"), "{name}: extra_headers");

        let mut want = map(&[
            ("grant_type", grant),
            ("scope", "read write"),
            ("audience", "api://x"),
        ]);
        match *grant {
            "password" => {
                want.insert("username".into(), "alice".into());
                want.insert("password".into(), format!("pw-{name}"));
            }
            "refresh_token" => {
                want.insert("refresh_token".into(), format!("rt-{name}"));
            }
            _ => {}
        }
        match *auth {
            "basic" => assert_eq!(
                req.basic(),
                Some(format!("id-{name}:secret-{name}")),
                "{name}: Basic id:secret"
            ),
            "post" => {
                assert_eq!(req.header("authorization"), None, "{name}");
                want.insert("client_id".into(), format!("id-{name}"));
                want.insert("client_secret".into(), format!("secret-{name}"));
            }
            _ => {
                assert_eq!(req.header("authorization"), None, "{name}");
                want.insert("client_id".into(), format!("id-{name}"));
            }
        }
        if *params_in == "body" {
            assert_eq!(
                req.header("content-type"),
                Some("application/x-www-form-urlencoded"),
                "{name}"
            );
            assert_eq!(req.form(), want, "{name}: the body");
            assert_eq!(
                req.query(),
                map(&[("tenant", "t1")]),
                "{name}: the query is the URL's own"
            );
        } else {
            assert!(req.body.is_empty(), "{name}: no body, got {:?}", req.body);
            want.insert("tenant".into(), "t1".into());
            assert_eq!(req.query(), want, "{name}: the query");
        }
        let written = sandbox
            .read(&format!("out/{name}"))
            .expect("output written");
        assert!(idp.is_issued(&written), "{name}: {written:?} was issued");
    }
}

#[test]
fn basic_encoding_form_encodes_id_and_secret_first() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let mut text = String::new();
    for encoding in ["raw", "form"] {
        text += &format!(
            "[[account]]\nname = \"{encoding}\"\ntoken_url = \"{url}/{encoding}\"\n\
             client_id = \"my id:x\"\nclient_secret = \"s&c:ret/+\"\n\
             basic_encoding = \"{encoding}\"\n\
             [[account.output]]\npath = \"{encoding}\"\n\n",
            url = idp.url(),
        );
    }
    let run = once(&sandbox.config(&text), &[]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);

    let requests = idp.requests();
    let basic = |encoding: &str| {
        requests
            .iter()
            .find(|r| r.path().ends_with(&format!("/{encoding}")))
            .and_then(|r| r.basic())
    };
    // As curl -u and the providers' samples do.
    assert_eq!(basic("raw").as_deref(), Some("my id:x:s&c:ret/+"));
    // RFC 6749 §2.3.1: application/x-www-form-urlencoded first.
    assert_eq!(
        basic("form").as_deref(),
        Some("my+id%3Ax:s%26c%3Aret%2F%2B")
    );
}

#[test]
fn once_writes_every_output_with_its_format_and_mode() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let text = format!(
        r#"
[[account]]
name = "msk"
token_url = "{url}"
client_id = "id"
client_secret = "secret"
client_auth = "post"
scope = "full"

[[account.output]]
path = "tokens/msk"

[[account.output]]
path = "tokens/msk.json"
format = "json"
mode = "0640"

[[account.output]]
path = "tokens/msk.env"
format = "env"
mode = 0o644

[[account.output]]
path = "tokens/msk.other.env"
format = "env"
env_var = "OTHER_VAR"
mode = "0600"

[[account.output]]
path = "tokens/msk.header"
format = "header"
mode = "0604"
"#,
        url = idp.url()
    );
    let before = SystemTime::now();
    let run = once(&sandbox.config(&text), &["msk"]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let issued = idp.issued();
    assert_eq!(issued.len(), 1);
    let token = &issued[0];

    assert_eq!(sandbox.read("tokens/msk").as_deref(), Some(token.as_str()));
    assert_eq!(sandbox.mode("tokens/msk"), 0o600, "the default mode");
    assert_eq!(
        sandbox.read("tokens/msk.env"),
        Some(format!("MSK_TOKEN={token}\n"))
    );
    assert_eq!(sandbox.mode("tokens/msk.env"), 0o644);
    assert_eq!(
        sandbox.read("tokens/msk.other.env"),
        Some(format!("OTHER_VAR={token}\n"))
    );
    assert_eq!(sandbox.mode("tokens/msk.other.env"), 0o600);
    // The provider says "bearer"; the header says "Bearer".
    assert_eq!(
        sandbox.read("tokens/msk.header"),
        Some(format!("Authorization: Bearer {token}\n"))
    );
    assert_eq!(sandbox.mode("tokens/msk.header"), 0o604);

    let json = sandbox.read("tokens/msk.json").expect("json output");
    assert!(json.ends_with('\n'));
    assert_eq!(sandbox.mode("tokens/msk.json"), 0o640);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json output is JSON");
    assert_eq!(v["account"], "msk");
    assert_eq!(v["access_token"], token.as_str());
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["scope"], "full");
    let (issued_at, expires_at) = (time_field(&v, "issued_at"), time_field(&v, "expires_at"));
    assert_eq!(
        expires_at.duration_since(issued_at).unwrap().as_secs(),
        3600
    );
    let slack = Duration::from_secs(2);
    assert!(issued_at + slack >= before && issued_at <= SystemTime::now() + slack);

    // Nothing but the outputs is left in the directory (no temporary files).
    let mut names: Vec<_> = std::fs::read_dir(sandbox.path("tokens"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["msk", "msk.env", "msk.header", "msk.json", "msk.other.env"]
    );
}

/// An RFC 3339 field of the json output.
fn time_field(v: &serde_json::Value, key: &str) -> SystemTime {
    let s = v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is a string"));
    assert!(s.ends_with('Z'), "{key} is UTC: {s}");
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{key} {s:?} is RFC 3339: {e}"))
        .into()
}

#[test]
fn lifetime_comes_from_expires_in_its_string_form_a_jwt_exp_or_default_lifetime() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let text = format!(
        "[[account]]\nname = \"a\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
         client_secret = \"secret\"\ndefault_lifetime = \"2h\"\n\
         [[account.output]]\npath = \"a.json\"\nformat = \"json\"\n",
        idp.url()
    );
    let config = sandbox.config(&text);
    for (reply, lifetime) in [
        (Expiry::In(1800), 1800),
        (Expiry::InString(5400), 5400),
        (Expiry::Missing, 7200),
        (Expiry::Jwt(4000), 4000),
    ] {
        idp.push(Reply::token_with(reply.clone()));
        let run = once(&config, &[]);
        assert_eq!(run.code(), Some(0), "{reply:?}: {}", run.stderr);
        let v: serde_json::Value =
            serde_json::from_str(&sandbox.read("a.json").expect("json output")).unwrap();
        assert_eq!(
            v["access_token"].as_str(),
            idp.issued().last().map(String::as_str)
        );
        let got = time_field(&v, "expires_at")
            .duration_since(time_field(&v, "issued_at"))
            .unwrap()
            .as_secs();
        // Times are written to the second, and a JWT's exp was set a moment before.
        assert!(
            got.abs_diff(lifetime) <= 1,
            "{reply:?}: lifetime {got} s, want {lifetime} s"
        );
    }
}

#[test]
fn once_exits_1_and_prints_the_provider_error() {
    for (reply, error) in [
        (Reply::InvalidClient, "invalid_client"),
        (Reply::InvalidGrant, "invalid_grant"),
    ] {
        let idp = FakeIdp::start(reply);
        let sandbox = Sandbox::new();
        let text = format!(
            "[[account]]\nname = \"cibmtr\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
             client_secret = \"Very-Secret-1\"\n[[account.output]]\npath = \"tok\"\n",
            idp.url()
        );
        let run = once(&sandbox.config(&text), &[]);
        assert_eq!(run.code(), Some(1), "{}", run.stderr);
        assert!(run.stderr.contains(error), "{error}: {}", run.stderr);
        assert!(run.stderr.contains("cibmtr"), "{}", run.stderr);
        assert!(!run.stderr.contains("Very-Secret-1"), "{}", run.stderr);
        assert_eq!(sandbox.read("tok"), None, "no output without a token");
        assert_eq!(
            idp.requests().len(),
            1,
            "{error} is not retried (it could lock the account)"
        );
    }
}

#[test]
fn once_retries_a_transient_failure() {
    let idp = FakeIdp::start(Reply::token(3600));
    idp.push(Reply::Status(500));
    let sandbox = Sandbox::new();
    let text = format!(
        "[[account]]\nname = \"a\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
         client_secret = \"secret\"\n[[account.output]]\npath = \"tok\"\n",
        idp.url()
    );
    let run = once(&sandbox.config(&text), &[]);
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert_eq!(idp.requests().len(), 2);
    assert_eq!(sandbox.read("tok"), idp.issued().first().cloned());
}

#[test]
fn once_exits_2_on_an_unknown_account() {
    let idp = FakeIdp::start(Reply::token(3600));
    let sandbox = Sandbox::new();
    let text = format!(
        "[[account]]\nname = \"a\"\ntoken_url = \"{}\"\nclient_id = \"id\"\n\
         client_secret = \"secret\"\n[[account.output]]\npath = \"tok\"\n",
        idp.url()
    );
    let run = once(&sandbox.config(&text), &["a", "nope"]);
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("\"nope\""), "{}", run.stderr);
    assert!(
        idp.requests().is_empty(),
        "nothing is fetched on a usage error"
    );
}

#[test]
fn a_typo_in_the_config_exits_2_naming_key_line_and_column() {
    let sandbox = Sandbox::new();
    let text = "[[account]]\nname = \"msk\"\n  tokne_url = \"https://idp.example/token\"\n\
                client_id = \"id\"\nclient_secret = \"secret\"\n\
                [[account.output]]\npath = \"tok\"\n";
    let config = sandbox.config(text);
    let want = format!(
        "{}:3:3: account.msk.tokne_url: unknown key \"tokne_url\"; did you mean \"token_url\"?",
        config.display()
    );
    for command in ["once", "run", "check"] {
        let mut cmd = tokend();
        cmd.arg(command).arg("-c").arg(&config);
        let run = crate::support::finish(cmd, SHORT);
        assert_eq!(run.code(), Some(2), "{command}: {}", run.stderr);
        assert!(run.stderr.contains(&want), "{command}: {}", run.stderr);
    }
}
