//! Keys, not just secrets (issue 13), against a real authorization server (panva's
//! oidc-provider, `support::oidc`) and the fake IdP: `private_key_jwt` with RS384 and
//! ES384 keys through `once` and `run`, a key the server does not know refused and held
//! until the key file changes, discovery from an issuer (and RFC 8414's fallback) and a
//! FHIR base, `tls_client_auth` over mutual TLS, and `tokend jwks` / `tokend check`.
//!
//! Keys and certificates are made with openssl for each test; the JWK sets registered
//! with the server are what `tokend jwks` prints. Waits are for states: outputs, the
//! server's own log of token requests, the daemon's socket.

use std::path::Path;

use serde_json::json;

use crate::support::fake_idp::{FakeIdp, Reply};
use crate::support::oidc::OidcProvider;
use crate::support::pki::{make_key, Pki};
use crate::support::{account_status, finish, once, tokend, Daemon, Sandbox, LONG, SHORT};

/// `tokend jwks -c CONFIG ACCOUNTS...`: the JWK set it prints.
fn jwks(config: &Path, accounts: &[&str]) -> serde_json::Value {
    let mut cmd = tokend();
    cmd.arg("jwks").arg("-c").arg(config).args(accounts);
    let out = finish(cmd, SHORT);
    assert_eq!(out.code(), Some(0), "tokend jwks: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("tokend jwks prints JSON")
}

/// oidc-provider client metadata for a private_key_jwt client with this JWK set.
fn pkj_client(client_id: &str, jwks: &serde_json::Value, alg: &str) -> serde_json::Value {
    json!({
        "client_id": client_id,
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": alg,
        "jwks": jwks,
        "grant_types": ["client_credentials"],
        "redirect_uris": [],
        "response_types": [],
    })
}

/// What no log may hold: the lines of the private keys (PEM bodies) in `keys`, a JWT
/// (an assertion starts `eyJ`: base64url of `{"`), the assertion's form field.
fn assert_log_has_no_key_material(log: &str, keys: &[&Path]) {
    for k in keys {
        let pem = std::fs::read_to_string(k).unwrap();
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !log.contains(line),
                "a line of {} in the log:\n{log}",
                k.display()
            );
        }
    }
    assert!(!log.contains("eyJ"), "a JWT in the log:\n{log}");
    assert!(!log.contains("client_assertion="), "{log}");
}

/// Waits until output `name` has held `n` distinct tokens (counting from when this is
/// called), each issued by `server`; returns them.
fn rotations(
    d: &Daemon,
    sandbox: &Sandbox,
    server: &OidcProvider,
    name: &str,
    n: usize,
) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    d.wait_until(&format!("{n} tokens in {name}"), LONG, || {
        if let Some(t) = sandbox.read(name) {
            if !seen.contains(&t) {
                assert!(
                    server.issued().contains(&t),
                    "{name} holds {t:?}, which the server never issued"
                );
                seen.push(t);
            }
        }
        (seen.len() >= n).then(|| seen.clone())
    })
}

#[test]
fn private_key_jwt_with_rs384_and_es384_keys_gets_tokens_through_once_and_run() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("");
    let rs = make_key(&root, "rs.pem", "rsa");
    let es = make_key(&root, "es.pem", "p384");
    let config = |issuer: &str| {
        format!(
            "[daemon]\nlog_level = \"debug\"\nsocket = \"tokend.sock\"\nstate_dir = \"state\"\n\n\
             [defaults]\nmin_refresh_interval = \"1s\"\nclient_auth = \"private_key_jwt\"\n\n\
             [[account]]\nname = \"rs\"\ntoken_url = \"{issuer}/token\"\nclient_id = \"rs-client\"\n\
             private_key = {{ file = \"rs.pem\" }}\nkey_id = \"rs-2026\"\nassertion_alg = \"RS384\"\n\
             [[account.output]]\npath = \"out/rs\"\n\n\
             [[account]]\nname = \"es\"\nissuer = \"{issuer}\"\nclient_id = \"es-client\"\n\
             private_key = {{ file = \"es.pem\" }}\n\
             [[account.output]]\npath = \"out/es\"\n"
        )
    };
    // The keys to register, as an operator gets them.
    let path = sandbox.config(&config("https://idp.invalid"));
    let (rs_jwks, es_jwks) = (jwks(&path, &["rs"]), jwks(&path, &["es"]));
    assert_eq!(rs_jwks["keys"][0]["kid"], "rs-2026");
    assert_eq!(
        (
            rs_jwks["keys"][0]["kty"].as_str(),
            rs_jwks["keys"][0]["alg"].as_str()
        ),
        (Some("RSA"), Some("RS384"))
    );
    let es_key = &es_jwks["keys"][0];
    assert_eq!(
        (es_key["crv"].as_str(), es_key["alg"].as_str()),
        (Some("P-384"), Some("ES384"))
    );
    assert_eq!(
        es_key["kid"].as_str().map(str::len),
        Some(43),
        "no key_id: the thumbprint"
    );
    let both = jwks(&path, &[]);
    assert_eq!(both["keys"].as_array().unwrap().len(), 2);
    let server = OidcProvider::start(json!({
        "ttl": 4,
        "clients": [
            pkj_client("rs-client", &rs_jwks, "RS384"),
            pkj_client("es-client", &es_jwks, "ES384"),
        ],
    }));
    let path = sandbox.config(&config(&server.issuer()));

    let out = once(&path, &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let issued = server.issued();
    for (name, client) in [("out/rs", "rs-client"), ("out/es", "es-client")] {
        let token = sandbox.read(name).expect("once wrote the output");
        assert!(issued.contains(&token), "{name}: {token:?} is the server's");
        let requests = server.requests_of(client);
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0]["status"], 200);
    }

    let d = Daemon::start(&path);
    for name in ["out/rs", "out/es"] {
        // The token `once` left, then two that `run` fetched.
        let seen = rotations(&d, &sandbox, &server, name, 3);
        assert_eq!(seen.len(), 3);
    }
    // Every request of the daemon got a token: each assertion was fresh (the server
    // refuses a jti it saw before) and valid.
    for r in server.log() {
        assert_eq!(r["status"], 200, "{r}");
    }
    let (_, _, log) = d.terminate();
    assert_log_has_no_key_material(&log, &[&rs, &es]);
}

#[test]
fn a_key_the_server_does_not_know_is_refused_and_held_until_the_key_file_changes() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("");
    let registered = make_key(&root, "registered.pem", "p384-pkcs8");
    let stranger = make_key(&root, "stranger.pem", "p384");
    std::fs::copy(&stranger, root.join("key.pem")).unwrap();
    let witness = make_key(&root, "witness.pem", "p256");
    let config = |issuer: &str, key: &str| {
        format!(
            "[daemon]\nlog_level = \"debug\"\nsocket = \"tokend.sock\"\nstate_dir = \"state\"\n\n\
             [defaults]\nmin_refresh_interval = \"1s\"\n\n\
             [[account]]\nname = \"k\"\nissuer = \"{issuer}\"\nclient_id = \"k-client\"\n\
             private_key = {{ file = \"{key}\" }}\nkey_id = \"k-1\"\nassertion_alg = \"ES384\"\n\
             [[account.output]]\npath = \"out/k\"\n\n\
             [[account]]\nname = \"witness\"\nissuer = \"{issuer}\"\nclient_id = \"w-client\"\n\
             private_key = {{ file = \"witness.pem\" }}\n\
             [[account.output]]\npath = \"out/w\"\n"
        )
    };
    let path = sandbox.config(&config("https://idp.invalid", "registered.pem"));
    let (k_jwks, w_jwks) = (jwks(&path, &["k"]), jwks(&path, &["witness"]));
    let server = OidcProvider::start(json!({
        "ttl": 2,
        "clients": [
            pkj_client("k-client", &k_jwks, "ES384"),
            pkj_client("w-client", &w_jwks, "ES256"),
        ],
    }));
    let path = sandbox.config(&config(&server.issuer(), "key.pem"));

    // `once` is refused, records the hold, and a second `once` honours it.
    let out = once(&path, &["k"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("invalid_client"), "{}", out.stderr);
    assert_eq!(
        server.requests_of("k-client").len(),
        1,
        "a refusal is not retried"
    );
    let out = once(&path, &["k"]);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("refused these credentials; holding"),
        "{}",
        out.stderr
    );
    assert_eq!(
        server.requests_of("k-client").len(),
        1,
        "no request during the hold"
    );

    // The daemon starts held: while the witness rotates its token, k asks nothing.
    let d = Daemon::start(&path);
    let socket = sandbox.path("tokend.sock");
    rotations(&d, &sandbox, &server, "out/w", 3);
    assert_eq!(
        server.requests_of("k-client").len(),
        1,
        "no request during the hold"
    );
    assert!(sandbox.read("out/k").is_none());

    // The operator puts the registered key in place (rename, as a rotation does): the
    // daemon reads it, ends the hold, and gets a token.
    std::fs::copy(&registered, root.join("key.pem.new")).unwrap();
    std::fs::rename(root.join("key.pem.new"), root.join("key.pem")).unwrap();
    let token = d.wait_until("k's token after the key changed", LONG, || {
        sandbox.read("out/k")
    });
    assert!(server.issued().contains(&token));
    let k = server.requests_of("k-client");
    assert_eq!(k.len(), 2, "{k:?}");
    assert_eq!(
        (k[0]["error"].as_str(), k[1]["status"].as_u64()),
        (Some("invalid_client"), Some(200))
    );
    d.wait_until("k fresh on the socket", SHORT, || {
        (account_status(&socket, "k")?["status"] == "fresh").then_some(())
    });
    let (_, _, log) = d.terminate();
    assert_log_has_no_key_material(&log, &[&registered, &stranger, &witness]);
}

#[test]
fn discovery_finds_the_token_endpoint_from_an_issuer_rfc_8414_and_a_fhir_base() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("");
    make_key(&root, "key.pem", "rsa-pkcs8");
    let config = |issuer: &str| {
        let account = |name: &str, at: &str| {
            format!(
                "[[account]]\nname = \"{name}\"\n{at}\nclient_id = \"d-client\"\n\
                 private_key = {{ file = \"key.pem\" }}\nkey_id = \"d\"\n\
                 [[account.output]]\npath = \"out/{name}\"\n\n"
            )
        };
        format!(
            "[daemon]\nstate_dir = \"state\"\n\n{}{}{}",
            account("oidc", &format!("issuer = \"{issuer}\"")),
            account("rfc8414", &format!("issuer = \"{issuer}/as8414\"")),
            account("smart", &format!("fhir_base = \"{issuer}/fhir\"")),
        )
    };
    let path = sandbox.config(&config("https://idp.invalid"));
    let server = OidcProvider::start(json!({
        "ttl": 60,
        "clients": [pkj_client("d-client", &jwks(&path, &["oidc"]), "RS384")],
    }));
    let path = sandbox.config(&config(&server.issuer()));
    let out = once(&path, &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(server.requests_of("d-client").len(), 3);
    let want = format!("{}/token", server.issuer());
    for name in ["oidc", "rfc8414", "smart"] {
        assert!(server
            .issued()
            .contains(&sandbox.read(&format!("out/{name}")).unwrap()));
        // The endpoint found is kept with the account's state (0600).
        let state = format!("state/{name}.json");
        let saved: serde_json::Value =
            serde_json::from_str(&sandbox.read(&state).unwrap()).unwrap();
        assert_eq!(
            saved["discovered"]["token_endpoint"],
            want.as_str(),
            "{name}"
        );
        assert_eq!(sandbox.mode(&state), 0o600);
    }
}

#[test]
fn an_account_with_only_fhir_base_client_id_a_key_file_and_a_kid_gets_and_keeps_tokens() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("");
    let key = make_key(&root, "smart.pem", "p384");
    let config = |base: &str| {
        format!(
            "[daemon]\nsocket = \"tokend.sock\"\n\n[defaults]\nmin_refresh_interval = \"1s\"\n\n\
             [[account]]\nname = \"smart\"\nfhir_base = \"{base}/fhir\"\nclient_id = \"smart-client\"\n\
             private_key = {{ file = \"smart.pem\" }}\nkey_id = \"smart-2026-11\"\n\
             [[account.output]]\npath = \"out/smart\"\n"
        )
    };
    let path = sandbox.config(&config("https://ehr.invalid"));
    let server = OidcProvider::start(json!({
        "ttl": 3,
        "clients": [pkj_client("smart-client", &jwks(&path, &[]), "ES384")],
    }));
    let path = sandbox.config(&config(&server.issuer()));
    let d = Daemon::start(&path);
    // The first token and at least two rotations, each the server's.
    let seen = rotations(&d, &sandbox, &server, "out/smart", 3);
    assert_eq!(seen.len(), 3);
    let socket = sandbox.path("tokend.sock");
    // Fresh between its refreshes (a read during one says "refreshing": the lifetime is
    // 3 s), with no error on record.
    let status = d.wait_until("smart fresh between its refreshes", LONG, || {
        account_status(&socket, "smart").filter(|s| s["status"] == "fresh")
    });
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    let (_, _, log) = d.terminate();
    assert_log_has_no_key_material(&log, &[&key]);
}

#[test]
fn tls_client_auth_gets_and_keeps_tokens_over_mutual_tls_and_a_wrong_certificate_fails_clearly() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("");
    let pki_dir = root.join("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    let pki = Pki::new(&pki_dir);
    pki.ca("other");
    let (good_cert, good_key) = pki.client("good", "tokend-mtls-client", "p256", "ca");
    let (stranger_cert, stranger_key) =
        pki.client("stranger", "tokend-mtls-client", "p384", "other");
    let (named_cert, named_key) = pki.client("named", "someone-else", "rsa", "ca");
    let server = OidcProvider::start(json!({
        "ttl": 3,
        "clients": [{
            "client_id": "mtls-client",
            "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_subject_dn": "CN=tokend-mtls-client",
            "grant_types": ["client_credentials"],
            "redirect_uris": [],
            "response_types": [],
        }],
        "tls": {
            "key": pki.path("server.key"),
            "cert": pki.path("server.crt"),
            "ca": pki.path("ca.crt"),
        },
    }));
    let account = |name: &str, cert: &Path, key: &Path| {
        format!(
            "[[account]]\nname = \"{name}\"\nfhir_base = \"{}/fhir\"\nclient_id = \"mtls-client\"\n\
             ca_file = \"pki/ca.crt\"\nclient_cert = {{ file = \"{}\" }}\nclient_key = {{ file = \"{}\" }}\n\
             [[account.output]]\npath = \"out/{name}\"\n\n",
            server.tls_base(),
            cert.display(),
            key.display()
        )
    };
    let text = format!(
        "[daemon]\nlog_level = \"debug\"\nsocket = \"tokend.sock\"\nstate_dir = \"state\"\n\n\
         [defaults]\nmin_refresh_interval = \"1s\"\n\n{}{}{}\
         [[account]]\nname = \"nocert\"\ntoken_url = \"{}/token\"\nclient_id = \"mtls-client\"\n\
         client_auth = \"none\"\nca_file = \"pki/ca.crt\"\n[[account.output]]\npath = \"out/nocert\"\n",
        account("mtls", &good_cert, &good_key),
        account("stranger", &stranger_cert, &stranger_key),
        account("named", &named_cert, &named_key),
        server.tls_base(),
    );
    let path = sandbox.config(&text);

    let mut check = tokend();
    check.arg("check").arg("-c").arg(&path);
    let out = finish(check, SHORT);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("mtls: client_cert CN=tokend-mtls-client (1 certificate(s)) valid until"),
        "{}",
        out.stdout
    );

    // A certificate of another CA: the server ends the handshake, and tokend says what
    // that likely means.
    let out = once(&path, &["stranger"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("failed to discover the token endpoint (fhir_base): https://127.0.0.1:")
            && out.stderr.contains("it may not accept client_cert"),
        "{}",
        out.stderr
    );
    // No certificate at all: the server's alert, and what to do about it.
    let out = once(&path, &["nocert"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("failed to reach https://127.0.0.1:")
            && out.stderr.contains("CertificateRequired (the server asks for a client certificate: set client_cert and client_key)"),
        "{}",
        out.stderr
    );
    // The CA's, for another subject: the server refuses the client; a refusal holds.
    let out = once(&path, &["named"]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("invalid_client"), "{}", out.stderr);
    assert_eq!(
        server.requests_of("mtls-client").len(),
        1,
        "{:?}",
        server.log()
    );

    let d = Daemon::start(&path);
    let seen = rotations(&d, &sandbox, &server, "out/mtls", 3);
    assert_eq!(seen.len(), 3);
    let requests = server.requests_of("mtls-client");
    assert!(requests.iter().all(|r| r["tls"] == true), "{requests:?}");
    assert!(requests.iter().filter(|r| r["status"] == 200).count() >= 3);
    // The refused account asked nothing more during its hold.
    assert_eq!(
        requests.iter().filter(|r| r["status"] != 200).count(),
        1,
        "{requests:?}"
    );
    let (_, _, log) = d.terminate();
    assert_log_has_no_key_material(&log, &[&good_key, &stranger_key, &named_key]);
}

#[test]
fn a_discovery_failure_is_transient_and_a_known_token_endpoint_keeps_being_used() {
    let idp = FakeIdp::start(Reply::token(300));
    let sandbox = Sandbox::new();
    let issuer = format!("http://{}", idp.addr());
    let doc =
        json!({ "issuer": issuer, "token_endpoint": format!("{issuer}/oauth2/token") }).to_string();
    let path = sandbox.config(&format!(
        "[daemon]\nstate_dir = \"state\"\n\n[[account]]\nname = \"a\"\nissuer = \"{issuer}\"\n\
         client_id = \"id\"\nclient_secret = \"s\"\n[[account.output]]\npath = \"tok\"\n"
    ));
    let paths = |from: usize| -> Vec<String> {
        idp.requests()[from..]
            .iter()
            .map(|r| r.path().to_owned())
            .collect()
    };

    idp.push(Reply::Body(200, doc));
    let out = once(&path, &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        paths(0),
        ["/.well-known/openid-configuration", "/oauth2/token"]
    );
    assert_eq!(idp.requests()[0].method, "GET");

    // Discovery fails (both documents): the endpoint found before is used.
    idp.push(Reply::Status(500));
    idp.push(Reply::Status(404));
    let out = once(&path, &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        paths(2),
        [
            "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server",
            "/oauth2/token"
        ]
    );
    assert!(
        out.stderr.contains("using the token endpoint found before"),
        "{}",
        out.stderr
    );

    // With no endpoint known, the failure is the attempt's, transient: `once` tries
    // again (three attempts), then says why, hostile documents and all.
    let fresh = sandbox.config(
        &std::fs::read_to_string(&path)
            .unwrap()
            .replace("state_dir = \"state\"", "state_dir = \"state2\""),
    );
    let before = idp.requests().len();
    idp.set_default(Reply::Status(503));
    idp.push(Reply::Body(200, "x".repeat(1024 * 1024)));
    idp.push(Reply::Body(
        200,
        format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)),
    ));
    idp.push(Reply::Body(
        200,
        json!({ "issuer": issuer, "token_endpoint": "http://idp.example/token" }).to_string(),
    ));
    let out = once(&fresh, &[]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    let asked = paths(before);
    assert_eq!(asked.len(), 6, "two documents, three attempts: {asked:?}");
    assert!(
        asked.iter().all(|p| p.starts_with("/.well-known/")),
        "{asked:?}"
    );
    for want in [
        "failed to discover the token endpoint (issuer)",
        "larger than 64 KiB",
        "not a JSON object",
        "in the clear",
        "answered HTTP 503",
    ] {
        assert!(out.stderr.contains(want), "{want:?} in {}", out.stderr);
    }
}

#[test]
fn check_and_jwks_name_the_key_and_refuse_what_cannot_work() {
    let sandbox = Sandbox::new();
    let root = sandbox.path("");
    make_key(&root, "key.pem", "p256");
    let text = "[[account]]\nname = \"k\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"c\"\n\
                private_key = { file = \"key.pem\" }\nkey_id = \"k-1\"\n[[account.output]]\npath = \"out/k\"\n\n\
                [[account]]\nname = \"s\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"c\"\n\
                client_secret = { file = \"key.pem\" }\n[[account.output]]\npath = \"out/s\"\n";
    let path = sandbox.config(text);
    let check = |path: &Path| {
        let mut cmd = tokend();
        cmd.arg("check").arg("-c").arg(path);
        finish(cmd, SHORT)
    };
    let out = check(&path);
    assert_eq!(out.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("k: private_key is an EC P-256 key, signs ES256 assertions with kid \"k-1\""),
        "{}",
        out.stdout
    );
    let jwk = jwks(&path, &["k"]);
    assert_eq!(jwk["keys"][0]["kid"], "k-1");
    let mut cmd = tokend();
    cmd.arg("jwks").arg("-c").arg(&path).arg("s");
    let out = finish(cmd, SHORT);
    assert_eq!(out.code(), Some(2));
    assert!(
        out.stderr
            .contains("does not use client_auth = \"private_key_jwt\""),
        "{}",
        out.stderr
    );

    // A key group can read: refused where it is configured, by check and by run.
    std::fs::set_permissions(
        root.join("key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.code(), Some(2));
    assert!(
        out.stderr
            .contains("config.toml:5:15: account.k.private_key: ")
            && out.stderr.contains("mode 0640"),
        "{}",
        out.stderr
    );
    let mut run = tokend();
    run.arg("run").arg("-c").arg(&path);
    let out = finish(run, SHORT);
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    // A key that does not fit its algorithm: the error is at assertion_alg.
    std::fs::set_permissions(
        root.join("key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let path = sandbox.config(&text.replace(
        "key_id = \"k-1\"",
        "key_id = \"k-1\"\nassertion_alg = \"RS384\"",
    ));
    let out = check(&path);
    assert_eq!(out.code(), Some(2));
    assert!(
        out.stderr
            .contains("config.toml:7:17: account.k.assertion_alg: file ")
            && out
                .stderr
                .contains("holds an EC P-256 key, but assertion_alg = \"RS384\" needs an RSA key"),
        "{}",
        out.stderr
    );
    let pem = std::fs::read_to_string(root.join("key.pem")).unwrap();
    assert!(!out.stderr.contains(pem.lines().nth(1).unwrap()));
}
