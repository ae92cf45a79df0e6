//! The Kubernetes test bed itself, end to end against a real API server
//! (`support/kube.rs`): a service account whose namespaced Role is what SPEC §8's
//! Kubernetes backend needs (leases and secrets: get, list, watch, create, update) gets a
//! token through the TokenRequest API and, with it, creates, reads and conditionally
//! updates a Lease and a Secret; a Role without `update` is refused with a 403 naming the
//! verb. The packaged sidecar manifest passes the API server's validation. A server of a
//! test's own takes a structured authentication config (what kubectl credential-plugin
//! tests need for a JWT issuer) and an audit log, and is gone once dropped. No tokend
//! code runs here: the backend's own tests build on this.

use std::process::Command;

use crate::support::kube::{KubeApiServer, Kubectl, Options};

/// A Role and RoleBinding for service account `sa` in `ns`, allowing `verbs` on leases
/// and secrets.
fn role(ns: &str, sa: &str, verbs: &[&str]) -> String {
    role_for(ns, sa, verbs, verbs)
}

/// [`role`] with `leases` on leases and `secrets` on secrets.
fn role_for(ns: &str, sa: &str, leases: &[&str], secrets: &[&str]) -> String {
    let quoted = |verbs: &[&str]| {
        verbs
            .iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (leases, secrets) = (quoted(leases), quoted(secrets));
    format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {sa}
rules:
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    verbs: [{leases}]
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: [{secrets}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {sa}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {sa}
subjects:
  - kind: ServiceAccount
    name: {sa}
    namespace: {ns}
"#
    )
}

/// A Lease as the backend writes one; with `resource_version`, a conditional write.
fn lease(holder: &str, resource_version: Option<&str>) -> String {
    let rv = resource_version
        .map(|v| format!("  resourceVersion: \"{v}\"\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: coordination.k8s.io/v1\n\
         kind: Lease\n\
         metadata:\n  name: tokend-test\n{rv}  labels:\n    app.kubernetes.io/managed-by: tokend\n\
         spec:\n  holderIdentity: {holder}\n  leaseDurationSeconds: 15\n  \
         renewTime: \"2026-01-01T00:00:00.000000Z\"\n"
    )
}

/// A Secret holding `record`.
fn secret(name: &str, record: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  name: {name}\n  labels:\n    app.kubernetes.io/managed-by: tokend\n\
         type: Opaque\n\
         stringData:\n  record: {record}\n"
    )
}

fn ok(what: &str, out: Kubectl) -> String {
    assert!(out.success(), "{what} failed:\n{}", out.stderr);
    out.stdout
}

#[test]
fn a_service_account_token_writes_leases_and_secrets_as_far_as_its_role_allows() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "tokend-rbac";
    kube.create_namespace(ns);
    kube.create_service_account(ns, "tokend");
    kube.create_service_account(ns, "no-update");
    let all = ["get", "list", "watch", "create", "update"];
    kube.apply(ns, &role(ns, "tokend", &all));
    kube.apply(ns, &role(ns, "no-update", &all[..4]));
    let member = kube.service_account_kubeconfig(ns, "tokend");
    let no_update = kube.service_account_kubeconfig(ns, "no-update");
    let as_member = |args: &[&str]| kube.kubectl(&member, args);

    let who = ok(
        "auth whoami",
        as_member(&[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ]),
    );
    assert_eq!(who, format!("system:serviceaccount:{ns}:tokend"));

    // Created by the service account.
    let file = kube.yaml_file(&lease("member-a", None));
    ok(
        "create the Lease",
        as_member(&["create", "-f", &file.to_string_lossy()]),
    );
    let file = kube.yaml_file(&secret("tokend-test", "sealed-1"));
    ok(
        "create the Secret",
        as_member(&["create", "-f", &file.to_string_lossy()]),
    );
    let holder = || {
        ok(
            "get the Lease",
            as_member(&[
                "get",
                "lease",
                "tokend-test",
                "-o=jsonpath={.spec.holderIdentity}",
            ]),
        )
    };
    assert_eq!(holder(), "member-a");
    let listed = ok(
        "list the Secrets by label",
        as_member(&[
            "get",
            "secrets",
            "-l",
            "app.kubernetes.io/managed-by=tokend",
            "-o",
            "name",
        ]),
    );
    assert_eq!(listed.trim(), "secret/tokend-test");

    // A write conditional on the resourceVersion read: it goes through once, and a second
    // write from the same (now stale) version is a 409.
    let rv = ok(
        "read the Lease's resourceVersion",
        as_member(&[
            "get",
            "lease",
            "tokend-test",
            "-o=jsonpath={.metadata.resourceVersion}",
        ]),
    );
    let file = kube.yaml_file(&lease("member-b", Some(&rv)));
    ok(
        "update the Lease",
        as_member(&["replace", "-f", &file.to_string_lossy()]),
    );
    assert_eq!(holder(), "member-b");
    let stale = as_member(&["replace", "-f", &file.to_string_lossy()]);
    assert!(
        !stale.success(),
        "a write from a stale resourceVersion went through"
    );
    assert!(
        stale.stderr.contains("Conflict") && stale.stderr.contains("has been modified"),
        "not a 409: {}",
        stale.stderr
    );
    let file = kube.yaml_file(&secret("tokend-test", "sealed-2"));
    ok(
        "update the Secret",
        as_member(&["replace", "-f", &file.to_string_lossy()]),
    );

    // Without `update`: reads and creates work, updates are refused naming the verb.
    let out = kube.kubectl(&no_update, &["get", "lease", "tokend-test", "-o", "name"]);
    assert_eq!(
        ok("get the Lease without update", out).trim(),
        "lease.coordination.k8s.io/tokend-test"
    );
    let file = kube.yaml_file(&secret("tokend-other", "sealed-3"));
    ok(
        "create a Secret without update",
        kube.kubectl(&no_update, &["create", "-f", &file.to_string_lossy()]),
    );
    for (yaml, resource) in [
        (lease("member-c", None), "leases"),
        (secret("tokend-test", "sealed-4"), "secrets"),
    ] {
        let file = kube.yaml_file(&yaml);
        let out = kube.kubectl(&no_update, &["replace", "-f", &file.to_string_lossy()]);
        assert!(
            !out.success(),
            "an update of {resource} without the verb went through"
        );
        let refusal = format!(
            "User \"system:serviceaccount:{ns}:no-update\" cannot update resource \"{resource}\""
        );
        assert!(
            out.stderr.contains("Forbidden") && out.stderr.contains(&refusal),
            "not a 403 naming the verb: {}",
            out.stderr
        );
    }
    assert_eq!(holder(), "member-b", "a refused update changed the Lease");
}

#[test]
fn the_sidecar_manifest_passes_the_api_servers_validation() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "tokend-sidecar";
    kube.create_namespace(ns);
    let manifest = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/kubernetes/tokend-sidecar.yaml"
    );
    let out = kube.admin(&["apply", "--dry-run=server", "-n", ns, "-f", manifest]);
    assert_eq!(
        out.matches("(server dry run)").count(),
        3,
        "the ConfigMap, the Secret and the Deployment: {out}"
    );
}

/// Done when 8: every manifest of packaging/kubernetes/ (the single-pod sidecar and the
/// 3-replica cluster with its ServiceAccount, Role, RoleBinding and key) passes the API
/// server's validation, RBAC objects included.
#[test]
fn kube_every_packaged_manifest_passes_a_server_dry_run() {
    let Some(kube) = KubeApiServer::shared() else {
        return;
    };
    let ns = "kube-packaging";
    kube.create_namespace(ns);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/kubernetes/");
    let out = kube.admin(&["apply", "--dry-run=server", "-n", ns, "-f", dir]);
    assert_eq!(
        out.matches("(server dry run)").count(),
        3 + 7,
        "the sidecar's 3 objects and the cluster's 7: {out}"
    );
    for kind in [
        "role.rbac",
        "rolebinding.rbac",
        "serviceaccount/tokend",
        "deployment.apps/tokend-cluster-example",
    ] {
        assert!(out.contains(kind), "{kind} in {out}");
    }
}

#[test]
fn a_server_of_its_own_reads_an_authentication_config_and_stops_when_dropped() {
    let config = tempfile::NamedTempFile::new().expect("a file for the authentication config");
    // Anonymous requests are allowed by default (/readyz, /version): this file turns them
    // off, so a 401 shows that the API server reads it.
    std::fs::write(
        config.path(),
        "apiVersion: apiserver.config.k8s.io/v1\n\
         kind: AuthenticationConfiguration\n\
         anonymous:\n  enabled: false\n",
    )
    .expect("write the authentication config");
    let options = Options {
        authentication_config: Some(config.path().to_path_buf()),
        audit: true,
        ..Options::default()
    };
    let Some(kube) = KubeApiServer::start(&options) else {
        return;
    };
    // A copy that outlives the server's directory, for the request after the drop.
    let ca_file = tempfile::NamedTempFile::new().expect("a file for the CA certificate");
    std::fs::copy(kube.ca_cert(), ca_file.path()).expect("copy the CA certificate");
    let curl = |url: &str| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(ca_file.path())
            .arg(url)
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let version = format!("{}/version", kube.server());
    assert_eq!(curl(&version), "401", "an anonymous request was let in");
    let who = kube.admin(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(who, "tokend-test-admin");
    let audit = std::fs::read_to_string(kube.dir().join("audit.log")).unwrap_or_default();
    assert!(
        audit.contains("\"username\":\"tokend-test-admin\""),
        "the admin's requests are not in the audit log; kube-apiserver's log:\n{}",
        kube.log()
    );
    drop(kube);
    // `stop` returned only once the processes were gone.
    assert_eq!(
        curl(&version),
        "000",
        "the API server still answers after the drop"
    );
}
mod members;
