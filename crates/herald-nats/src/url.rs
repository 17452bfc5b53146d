//! NATS engine URLs: `nats://[user:password@]host:port[,host:port…]` or `tls://…`.

/// The servers of a NATS URL, and the user it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Servers {
    pub addresses: Vec<String>,
    pub tls: bool,
    pub user: Option<(String, String)>,
}

/// Parses `nats://[user:password@]host:port[,host:port…]` (or `tls://…`).
pub fn parse_url(url: &str) -> Result<Servers, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?} is not a NATS URL"))?;
    let tls = match scheme {
        "nats" => false,
        "tls" => true,
        other => return Err(format!("unknown NATS scheme {other:?}: use nats:// or tls://")),
    };
    let rest = rest.trim_end_matches('/');
    let (user, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (name, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((name.to_owned(), password.to_owned())), hosts)
        }
        None => (None, rest),
    };
    let mut addresses = Vec::new();
    for host in hosts.split(',') {
        // Later servers may repeat the scheme (`nats://a:4222,nats://b:4222`); it must be the same.
        let host = match host.split_once("://") {
            Some((again, host)) if again == scheme => host.trim_end_matches('/'),
            Some((other, _)) => return Err(format!("{other}:// mixed with {scheme}:// in one URL")),
            None => host,
        };
        let (name, port) = host.rsplit_once(':').ok_or_else(|| format!("{host:?} needs a port (host:4222)"))?;
        if name.is_empty() || port.parse::<u16>().is_err() || name.contains(['/', '?', '#', ' ']) {
            return Err(format!("{host:?} is not host:port"));
        }
        addresses.push(format!("{scheme}://{host}"));
    }
    Ok(Servers { addresses, tls, user })
}

/// Checks that `url` is a NATS URL this engine can use (without connecting).
pub fn check_url(url: &str) -> Result<(), String> {
    let servers = parse_url(url)?;
    for address in &servers.addresses {
        address.parse::<async_nats::ServerAddr>().map_err(|e| format!("{address}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let servers = parse_url("nats://127.0.0.1:4222,127.0.0.1:4223").expect("url");
        assert_eq!(servers.addresses, ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]);
        let again = parse_url("nats://127.0.0.1:4222,nats://127.0.0.1:4223/").expect("url");
        assert_eq!(again.addresses, servers.addresses);
        assert!(parse_url("nats://h:1,tls://h:2").is_err());
        assert!(!servers.tls);
        let servers = parse_url("tls://me:secret@nats.example:4222/").expect("url");
        assert!(servers.tls);
        assert_eq!(servers.user, Some(("me".into(), "secret".into())));
        for bad in ["nats://", "nats://host", "redis://h:1", "nats://h:x", "nats://h:1/x", "h:4222"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(check_url("nats://127.0.0.1:4222").is_ok());
    }
}
