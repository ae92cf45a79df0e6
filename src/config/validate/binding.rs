//! `token_binding` (SPEC §9): `"bearer"` (the default) or `"dpop"` (RFC 9449), with
//! `dpop_alg` and `dpop_key`, and what a DPoP-bound account must and must not have: a
//! socket and `urls` (readers get a proof per request, only for those URLs), and no file
//! outputs (a bound token in a file is worth nothing without the key, which never
//! leaves tokend).
//!
//! The key file itself is read and checked in `files`; the `state_dir` a key made by
//! tokend needs is checked across the config, in `validate`.

use super::{At, Ctx, KeyFile, KeyUse};
use crate::config::{DpopAlg, DpopConfig};

/// What the account's `token_binding` keys say; None when it is a bearer account (or
/// a DPoP one with errors, which are in `cx`).
pub(super) fn binding(cx: &mut Ctx<'_>, at: &At<'_>, has_socket: bool) -> Option<DpopConfig> {
    let (a, d) = (at.a, at.d);
    let dpop = cx.choice(
        &pick!(a, d, token_binding),
        at.k("token_binding"),
        &[("bearer", false), ("dpop", true)],
        false,
    );
    if !dpop {
        for (key, span) in [
            ("dpop_alg", pick!(a, d, dpop_alg).map(|v| v.span())),
            ("dpop_key", pick!(a, d, dpop_key).map(|v| v.span())),
        ] {
            if let Some(span) = span {
                cx.err(span, at.k(key), "only used with token_binding = \"dpop\"");
            }
        }
        return None;
    }
    let before = cx.errors.len();
    let binding_at = pick!(a, d, token_binding).map_or(at.span.clone(), |v| v.span());
    let alg = match pick!(a, d, dpop_alg) {
        None => DpopAlg::Es256,
        Some(v) => match DpopAlg::ALL.iter().find(|(n, _)| n == v.get_ref()) {
            Some((_, alg)) => *alg,
            None => {
                let names: Vec<_> = DpopAlg::ALL.iter().map(|(n, _)| *n).collect();
                cx.err(
                    v.span(),
                    at.k("dpop_alg"),
                    format!("{:?} is not one of {}", v.get_ref(), names.join(" | ")),
                );
                DpopAlg::Es256
            }
        },
    };
    let key = match pick!(a, d, dpop_key) {
        Some(k) => {
            let spec = cx.secret(&k, at.k("dpop_key"));
            if let Some(spec) = &spec {
                let key_at = cx.locate(k.span(), at.k("dpop_key"), String::new());
                cx.key_files.push(KeyFile {
                    spec: spec.clone(),
                    at: key_at,
                    what: KeyUse::Dpop { alg },
                });
            }
            spec
        }
        None if !alg.can_generate() => {
            let span = pick!(a, d, dpop_alg).map_or(binding_at.clone(), |v| v.span());
            cx.err(
                span,
                at.k("dpop_alg"),
                format!("dpop_alg = \"{alg}\" needs dpop_key (an RSA key in PEM): tokend makes EC keys only (ES256, ES384)"),
            );
            None
        }
        None => None,
    };
    if !has_socket {
        cx.err(
            binding_at.clone(),
            at.k("token_binding"),
            "token_binding = \"dpop\" needs [daemon] socket: a bound token needs a proof per request, and readers get both through the socket",
        );
    }
    for (i, o) in at.a.output.iter().flatten().enumerate() {
        cx.err(
            o.span(),
            format!("{}.output[{}]", at.label, i + 1),
            "token_binding = \"dpop\" takes no file outputs: a bound token needs a proof per request: read it through the socket (POST /v1/tokens/NAME/dpop, tokend get NAME --dpop METHOD URL)",
        );
    }
    if at.a.urls.as_ref().is_none_or(|u| u.get_ref().is_empty()) {
        cx.err(
            at.a.urls.as_ref().map_or(binding_at, |u| u.span()),
            at.k("urls"),
            "token_binding = \"dpop\" needs \"urls\": proofs are minted only for URLs under one of them (e.g. urls = [\"https://fhir.example.org/\"])",
        );
    }
    if cx.errors.len() > before {
        return None;
    }
    Some(DpopConfig { alg, key })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, parse};
    use crate::config::{DpopAlg, DpopConfig, SecretSpec};

    const DPOP: &str = "[daemon]\nsocket = \"/run/t.sock\"\nstate_dir = \"/var/lib/tokend\"\n\
        [[account]]\nname = \"fhir\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"id\"\n\
        client_secret = { env = \"S\" }\ntoken_binding = \"dpop\"\nurls = [\"https://fhir.example/r4/\"]\n";

    #[test]
    fn a_dpop_account_gets_es256_and_a_key_kept_in_state_dir_by_default() {
        let c = parse(DPOP).unwrap();
        assert_eq!(
            c.accounts[0].dpop.as_deref(),
            Some(&DpopConfig {
                alg: DpopAlg::Es256,
                key: None
            })
        );
        let c = parse(&format!(
            "{DPOP}dpop_alg = \"PS256\"\ndpop_key = {{ file = \"/k.pem\" }}\n"
        ))
        .unwrap();
        let d = c.accounts[0].dpop.as_deref().unwrap();
        assert_eq!(d.alg, DpopAlg::Ps256);
        assert_eq!(d.key, Some(SecretSpec::File("/k.pem".into())));
        assert!(c.accounts[0]
            .secrets()
            .iter()
            .any(|(k, _)| *k == "dpop_key"));
        let bearer = parse(&DPOP.replace("token_binding = \"dpop\"\n", "")).unwrap();
        assert!(bearer.accounts[0].dpop.is_none());
        let dbg = format!("{:?}", c.accounts[0]);
        assert!(dbg.contains("Ps256") && dbg.contains("/k.pem"), "{dbg}");
    }

    #[test]
    fn check_refuses_file_outputs_and_a_dpop_account_without_urls_socket_or_state_dir() {
        let e = errors(&format!("{DPOP}[[account.output]]\npath = \"/x\"\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key, "account.fhir.output[1]");
        assert!(
            e[0].message
                .contains("a bound token needs a proof per request: read it through the socket"),
            "{}",
            e[0]
        );
        let e = errors(&DPOP.replace("urls = [\"https://fhir.example/r4/\"]\n", ""));
        assert_eq!(e[0].key, "account.fhir.urls", "{}", e[0]);
        assert!(e[0].message.contains("needs \"urls\""), "{}", e[0]);
        assert_eq!(e[0].line, 9, "at token_binding: {}", e[0]);
        let e = errors(&DPOP.replace("socket = \"/run/t.sock\"\n", ""));
        assert!(
            e.iter().any(|e| e.key == "account.fhir.token_binding"
                && e.message.contains("needs [daemon] socket")),
            "{e:?}"
        );
        let e = errors(&DPOP.replace("state_dir = \"/var/lib/tokend\"\n", ""));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].message
                .contains("without dpop_key needs [daemon] state_dir"),
            "{}",
            e[0]
        );
        // With its own key it needs no state_dir.
        let own = DPOP.replace("state_dir = \"/var/lib/tokend\"\n", "")
            + "dpop_key = { file = \"/k.pem\" }\n";
        assert!(parse(&own).is_ok());
    }

    #[test]
    fn dpop_keys_are_refused_on_a_bearer_account_and_rsa_needs_a_key() {
        let bearer = DPOP.replace("token_binding = \"dpop\"\n", "dpop_alg = \"ES384\"\n");
        let e = errors(&bearer);
        assert_eq!(e[0].key, "account.fhir.dpop_alg");
        assert!(e[0]
            .message
            .contains("only used with token_binding = \"dpop\""));
        let e = errors(&format!("{DPOP}dpop_alg = \"HS256\"\n"));
        assert!(
            e[0].message
                .contains("\"HS256\" is not one of ES256 | ES384 | RS256 | PS256"),
            "{}",
            e[0]
        );
        let e = errors(&format!("{DPOP}dpop_alg = \"RS256\"\n"));
        assert_eq!(
            (e[0].key.as_str(), e[0].line),
            ("account.fhir.dpop_alg", 11)
        );
        assert!(e[0].message.contains("needs dpop_key"), "{}", e[0]);
        let e = errors(&DPOP.replace("\"dpop\"", "\"mtls\""));
        assert!(
            e[0].message.contains("not one of bearer | dpop"),
            "{}",
            e[0]
        );
    }
}
