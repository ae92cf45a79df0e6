//! The one config builder of the integration tests: an `[[account]]` (and the
//! `[daemon]` section) as TOML text, with the keys a test sets. Test files keep thin
//! wrappers that say what their accounts share (a secret file, a json output, ...).

use std::path::Path;

/// One `[[account]]` with its outputs, built up key by key.
#[derive(Clone)]
pub struct Account {
    name: String,
    url: String,
    client_id: String,
    secret: String,
    extra: Vec<String>,
    outputs: Vec<String>,
}

/// Account `name` asking the token endpoint at `url`: client id `id`, the client secret
/// in the file `secret` (relative to the config), no output yet.
pub fn account(name: &str, url: &str) -> Account {
    Account {
        name: name.to_owned(),
        url: url.to_owned(),
        client_id: "id".to_owned(),
        secret: "client_secret = { file = \"secret\" }".to_owned(),
        extra: Vec::new(),
        outputs: Vec::new(),
    }
}

impl Account {
    pub fn client_id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.client_id);
        self
    }

    /// The client secret from the environment variable `var` instead of a file.
    pub fn secret_env(mut self, var: &str) -> Self {
        self.secret = format!("client_secret = {{ env = \"{var}\" }}");
        self
    }

    /// A public client (`client_auth = "none"`): no client secret.
    pub fn public_client(mut self) -> Self {
        self.secret = "client_auth = \"none\"".to_owned();
        self
    }

    /// More keys of the account (TOML lines), as written.
    pub fn with(mut self, keys: &str) -> Self {
        if !keys.is_empty() {
            self.extra.push(keys.to_owned());
        }
        self
    }

    /// A raw output at `path`.
    pub fn output(mut self, path: &str) -> Self {
        self.outputs
            .push(format!("[[account.output]]\npath = \"{path}\"\n"));
        self
    }

    /// A json output at `path`.
    pub fn json_output(mut self, path: &str) -> Self {
        self.outputs.push(format!(
            "[[account.output]]\npath = \"{path}\"\nformat = \"json\"\n"
        ));
        self
    }

    /// The TOML text.
    pub fn toml(&self) -> String {
        let mut text = format!(
            "[[account]]\nname = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\n{}\n",
            self.name, self.url, self.client_id, self.secret
        );
        for e in &self.extra {
            text.push_str(e);
            text.push('\n');
        }
        for o in &self.outputs {
            text.push_str(o);
        }
        text
    }
}

/// A `[daemon]` section serving the socket `socket` with `more` keys (TOML lines).
pub fn daemon(socket: &Path, more: &str) -> String {
    format!("[daemon]\nsocket = \"{}\"\n{more}\n", socket.display())
}
