//! Object keys: `<kind>/<name>` relative to the store prefix.

use std::fmt;

/// The kinds of object in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Ingress TLS certificates (`certs/<name>`).
    Certs,
    Services,
    Routes,
    TcpRoutes,
    Groups,
    /// External callers of ingress routes, with their credentials.
    Consumers,
    Nodes,
    Instances,
    /// The admin API's change log (`history/<id>`).
    History,
    /// Join tokens of the mesh CA (`join_tokens/<name>`): who may obtain
    /// which identity (only a hash of each token is kept).
    JoinTokens,
}

impl Kind {
    /// Config kinds, managed through the admin API, in dependency order
    /// (a route refers to services and consumers, a service to a group).
    pub const CONFIG: [Kind; 6] = [
        Kind::Certs,
        Kind::Groups,
        Kind::Consumers,
        Kind::Services,
        Kind::Routes,
        Kind::TcpRoutes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Certs => "certs",
            Kind::Services => "services",
            Kind::Routes => "routes",
            Kind::TcpRoutes => "tcp_routes",
            Kind::Groups => "groups",
            Kind::Consumers => "consumers",
            Kind::Nodes => "nodes",
            Kind::Instances => "instances",
            Kind::History => "history",
            Kind::JoinTokens => "join_tokens",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "certs" => Kind::Certs,
            "services" => Kind::Services,
            "routes" => Kind::Routes,
            "tcp_routes" => Kind::TcpRoutes,
            "groups" => Kind::Groups,
            "consumers" => Kind::Consumers,
            "nodes" => Kind::Nodes,
            "instances" => Kind::Instances,
            "history" => Kind::History,
            "join_tokens" => Kind::JoinTokens,
            _ => return None,
        })
    }

    /// Config kinds are written by operators; runtime kinds by the
    /// processes themselves, under leases.
    pub fn is_config(self) -> bool {
        matches!(
            self,
            Kind::Certs
                | Kind::Services
                | Kind::Routes
                | Kind::TcpRoutes
                | Kind::Groups
                | Kind::Consumers
        )
    }

    /// The key prefix of every object of this kind, e.g. `services/`.
    pub fn prefix(self) -> String {
        format!("{}/", self.as_str())
    }
}

/// Node records are keyed `nodes/<node kind>/<id>` so that a process can
/// watch one kind of node (a sidecar watches `nodes/gateway/` only, not
/// every sidecar in the mesh).
pub fn node_key(kind: crate::model::NodeKind, id: &str) -> Key {
    Key::new(Kind::Nodes, format!("{}/{id}", kind.as_str()))
}

/// The prefix of every node record of one kind, e.g. `nodes/gateway/`.
pub fn node_prefix(kind: crate::model::NodeKind) -> String {
    format!("nodes/{}/", kind.as_str())
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key of one object, relative to the store prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    /// The object name. For instances: `<service>/<id>`; for nodes:
    /// `<node kind>/<id>`.
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Key {
            kind,
            name: name.into(),
        }
    }

    /// Parses a relative key such as `routes/checkout`. Returns `None` for
    /// keys of unknown kinds or with an invalid name.
    pub fn parse(rel: &str) -> Option<Key> {
        let (kind, name) = rel.split_once('/')?;
        let kind = Kind::parse(kind)?;
        let ok = match kind {
            Kind::Instances => match name.split_once('/') {
                Some((svc, id)) => valid_name(svc) && valid_name(id),
                None => false,
            },
            Kind::Nodes => match name.split_once('/') {
                Some((kind, id)) => {
                    ["gateway", "sidecar", "admin"].contains(&kind) && valid_name(id)
                }
                None => false,
            },
            _ => valid_name(name),
        };
        ok.then(|| Key::new(kind, name))
    }
}

impl Key {
    /// A node record's id (`gw-1` of `nodes/gateway/gw-1`); the name
    /// itself for other kinds.
    pub fn node_id(&self) -> &str {
        match self.kind {
            Kind::Nodes => self.name.split_once('/').map_or(&*self.name, |(_, id)| id),
            _ => &self.name,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.name)
    }
}

/// Object names: 1–128 characters of `a-z 0-9 - _ .`, starting and ending
/// with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys() {
        assert_eq!(
            Key::parse("routes/checkout"),
            Some(Key::new(Kind::Routes, "checkout"))
        );
        assert_eq!(
            Key::parse("instances/orders/host-1"),
            Some(Key::new(Kind::Instances, "orders/host-1"))
        );
        assert_eq!(Key::parse("routes/Bad"), None);
        assert_eq!(Key::parse("routes/a/b"), None);
        assert_eq!(Key::parse("widgets/a"), None);
        assert_eq!(Key::parse("instances/orders"), None);
        assert_eq!(
            Key::parse("nodes/gateway/gw-1"),
            Some(node_key(crate::model::NodeKind::Gateway, "gw-1"))
        );
        assert_eq!(Key::parse("nodes/gw-1"), None);
        assert_eq!(Key::parse("nodes/robot/gw-1"), None);
        assert_eq!(Key::parse("routes/-x"), None);
        assert_eq!(Key::new(Kind::Groups, "shop").to_string(), "groups/shop");
    }
}
