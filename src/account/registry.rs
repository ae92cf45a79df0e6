//! The account map readers see: every running account by name, as a cheap snapshot.
//! The supervisor (`daemon`) alone builds it and publishes a new one on a `watch`
//! channel whenever accounts start or stop; the socket server only reads it.
//! [`ByName`] keys it (and the supervisor's own map) by the account itself.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::AccountView;
use crate::config::Account;

/// Every running account by name, as readers see them.
pub type Accounts = Arc<BTreeMap<ByName, AccountView>>;

/// An account as the key of a map by its name: the account's own name is the key, so a
/// map of 10,000 accounts holds no copy of their names (a `String` key is 24 bytes in
/// the map's node and an allocation of its own, for each account and each map). Looked
/// up, compared and ordered as the name alone (`map.get("name")`).
#[derive(Clone)]
pub struct ByName(pub Arc<Account>);

impl ByName {
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

impl Borrow<str> for ByName {
    fn borrow(&self) -> &str {
        self.name()
    }
}

impl PartialEq for ByName {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for ByName {}

impl PartialOrd for ByName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.name().cmp(other.name())
    }
}

impl std::fmt::Debug for ByName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.name(), f)
    }
}

impl std::fmt::Display for ByName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;
    use std::path::Path;

    #[test]
    fn accounts_keyed_by_themselves_are_found_and_ordered_by_name() {
        let text = ["b", "a", "c"]
            .iter()
            .map(|n| {
                format!(
                    "[[account]]\nname = \"{n}\"\ntoken_url = \"https://idp.example/t\"\n\
                     client_id = \"id\"\nclient_secret = \"s\"\n[[account.output]]\npath = \"/x/{n}\"\n"
                )
            })
            .collect::<String>();
        let config = parse_str(&text, Path::new("/c.toml")).unwrap();
        let map: BTreeMap<ByName, usize> = config
            .accounts
            .into_iter()
            .enumerate()
            .map(|(i, a)| (ByName(Arc::new(a)), i))
            .collect();
        assert_eq!(map.get("a"), Some(&1));
        assert_eq!(map["c"], 2);
        assert!(!map.contains_key("d"));
        let names: Vec<String> = map.keys().map(ToString::to_string).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(format!("{:?}", map.keys().next().unwrap()), "\"a\"");
    }
}
