//! The client's address: from the header the proxy in front of PostgREST appends to, counting
//! trusted hops from the right, normalized so one client has one key.

use super::settings::same_text;
use super::settings::HEADERS;
use super::LAST_HEADERS;
use crate::pg::guc;

/// The client address that keys anonymous callers: from the header named by
/// quota_ext.client_ip_header in request.headers (PostgREST passes every request header there,
/// names lower-cased), the entry quota_ext.trusted_proxy_hops from the right of its
/// comma-separated list: with one proxy that appends the address it received the request from,
/// the rightmost entry, which that proxy wrote and the client cannot choose. A list shorter
/// than the hops gives its leftmost entry (still written by one of the proxies). No header
/// configured, 0 hops or no such header: None (the caller is `ip:unknown`). Parsed once per
/// distinct text of request.headers and of the two settings; read only when a call needs the
/// caller's own key.
pub fn client_ip() -> Option<String> {
    let raw_headers = HEADERS.text();
    let header = guc::client_ip_header();
    let hops = guc::trusted_proxy_hops();
    LAST_HEADERS.with(|h| {
        let mut h = h.borrow_mut();
        if !same_text(h.0.as_bytes(), raw_headers) || h.2 != header || h.3 != hops {
            let headers = String::from_utf8_lossy(raw_headers).into_owned();
            let ip = address_from(&headers, &header, hops);
            *h = (headers, ip, header, hops);
        }
        h.1.clone()
    })
}

/// The entry `hops` from the right of header `name` in the JSON object `headers`.
pub fn address_from(headers: &str, name: &str, hops: usize) -> Option<String> {
    if name.is_empty() || hops == 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(headers).ok()?;
    let list = v.get(name)?.as_str()?;
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let at = entries.len().saturating_sub(hops);
    Some(entries[at]).filter(|x| !x.is_empty()).map(normalize_address)
}

/// One key per client, whatever the proxy's notation: a port and brackets go (`[2001:db8::1]:443`,
/// `192.0.2.1:5000`), an IPv4-mapped IPv6 address is its IPv4 address, and an IPv6 address
/// counts by its /64 (one subscriber's network: every host of it can take any address in it).
/// What does not parse is kept as it is, cut at 64 characters.
pub fn normalize_address(entry: &str) -> String {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};
    let e = entry.trim().trim_matches('"');
    let ip = e
        .parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|x| x.parse::<IpAddr>().ok())
        });
    match ip {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{}/64", Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        None => e.chars().take(MAX_ADDRESS_CHARS).collect(),
    }
}

/// Longest unparsed address kept.
const MAX_ADDRESS_CHARS: usize = 64;
