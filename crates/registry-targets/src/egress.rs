//! Where a connection to an address a tenant named may go: a `WebhookTarget`'s URL, a
//! `Bundle`'s `url` source. Public addresses, and the networks the admin allows
//! (`--allow-private-destinations`); never, unless allowed, loopback, private (RFC 1918,
//! unique local), shared (100.64/10), link-local (the cloud's metadata service at
//! 169.254.169.254), unspecified, broadcast or multicast addresses. An address literal in
//! the URL is checked before connecting; a name is checked as it resolves (the resolver
//! hands the HTTP client only the addresses allowed, so a name that resolves elsewhere
//! later, DNS rebinding, gets nowhere either).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

/// The destinations allowed besides public addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    pub allow: Vec<ipnet::IpNet>,
}

/// Is `ip` an address of the public internet?
pub fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

impl Egress {
    /// May a connection go to `ip`?
    pub fn permits(&self, ip: IpAddr) -> bool {
        public(ip) || self.allow.iter().any(|n| n.contains(&ip))
    }

    /// Refuses a URL whose host is an address not allowed (a name is checked as it
    /// resolves: [`Egress::resolver`]).
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        match host.parse::<IpAddr>() {
            Ok(ip) if !self.permits(ip) => Err(refused(host)),
            _ => Ok(()),
        }
    }

    /// A resolver for reqwest that hands out only the addresses allowed.
    pub fn resolver(&self) -> Arc<dyn reqwest::dns::Resolve> {
        Arc::new(self.clone())
    }
}

fn refused(what: &str) -> String {
    format!(
        "{what} is a private, loopback or link-local address: not reached (an admin allows \
         such networks with --allow-private-destinations)"
    )
}

impl reqwest::dns::Resolve for Egress {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let me = self.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                found.into_iter().filter(|a| me.permits(a.ip())).collect();
            if allowed.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> = refused(&format!(
                    "{host} resolves only to addresses that are not allowed: it"
                ))
                .into();
                return Err(e);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_unless_allowed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!public(ip(private)), "{private}");
        }
        for open in ["8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(public(ip(open)), "{open}");
        }
        let e = Egress {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(e.permits(ip("10.1.2.3")));
        assert!(!e.permits(ip("169.254.169.254")));
    }

    #[test]
    fn urls_naming_an_address_are_checked_before_connecting() {
        let e = Egress::default();
        for bad in [
            "http://127.0.0.1:8080/hook",
            "https://169.254.169.254/latest/meta-data",
            "http://user:pw@[::1]:9/x",
            "http://10.0.0.1",
        ] {
            let why = e.check_url(bad).unwrap_err();
            assert!(why.contains("not reached"), "{bad}: {why}");
        }
        for ok in ["https://hooks.example.com/x", "http://8.8.8.8:80/"] {
            e.check_url(ok).unwrap();
        }
    }

    #[tokio::test]
    async fn names_resolving_to_a_private_address_get_nowhere() {
        use reqwest::dns::Resolve as _;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = Egress::default()
            .resolve(name)
            .await
            .err()
            .expect("localhost is refused");
        assert!(err.to_string().contains("not allowed"), "{err}");
        let allowed = Egress {
            allow: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        };
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(allowed.resolve(name).await.is_ok());
    }
}
