//! Per-route rate limits for the pre-request hook: the rows of quota.rate_routes, each a method
//! (or `*`), a LIKE pattern on `request.path`, a policy and what keys its bucket (the caller, or
//! its address). Every matching row applies, in priority order; all must allow. Cached per
//! backend like the policies (cache::generation).

use crate::pg::spi::{self, Stmt};
use crate::quota::cache;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::rc::Rc;

/// What keys a route's bucket.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyBy {
    /// The JWT subject (the caller's address when anonymous), as the policy path keys it.
    User,
    /// The client address (`ip:<address>`), signed in or not.
    Ip,
}

#[derive(Clone, Debug)]
pub struct Route {
    /// Upper-case method, or `*`.
    pub method: String,
    pub pattern: String,
    pub policy: String,
    pub key_by: KeyBy,
}

thread_local! {
    /// (the cache generation it was filled under, the routes in the order they apply).
    static ROUTES: RefCell<(u64, Option<Rc<Vec<Route>>>)> = const { RefCell::new((0, None)) };
}

static ROUTES_LOAD: Stmt = Stmt {
    sql: "SELECT method, path_pattern, policy, key_by FROM quota.rate_routes
           ORDER BY priority, policy, method, path_pattern",
    args: &[],
};

/// Every route, in the order they apply (priority, then policy, method, pattern), from the
/// backend cache. Empty on the tables of a version before 0.8.0.
pub fn routes() -> Rc<Vec<Route>> {
    cache::follow_committed_changes();
    let gen = cache::generation();
    if let Some(hit) = ROUTES.with(|r| {
        let r = r.borrow();
        (r.0 == gen).then(|| r.1.clone()).flatten()
    }) {
        return hit;
    }
    cache::watch_tables();
    let routes = if crate::pg::catalog::shape().rate_routes {
        let _owner = crate::request::AsOwner::enter();
        Spi::connect_mut(|client| {
            spi::run(client, &ROUTES_LOAD, &[])
                .map(|row| Route {
                    method: spi::get::<String>(&row, 1).expect("method"),
                    pattern: spi::get::<String>(&row, 2).expect("path_pattern"),
                    policy: spi::get::<String>(&row, 3).expect("policy"),
                    key_by: if spi::get::<String>(&row, 4).as_deref() == Some("ip") {
                        KeyBy::Ip
                    } else {
                        KeyBy::User
                    },
                })
                .collect()
        })
    } else {
        Vec::new()
    };
    let routes = Rc::new(routes);
    if cache::generation() == gen {
        cache::note_fill();
        ROUTES.with(|r| *r.borrow_mut() = (gen, Some(routes.clone())));
    }
    routes
}

impl Route {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (self.method == "*" || self.method.eq_ignore_ascii_case(method))
            && like(path.as_bytes(), self.pattern.as_bytes())
    }
}

/// SQL's LIKE: `%` any run of characters, `_` any one character, `\` takes the next one as it
/// is. On bytes, with `_` spanning one UTF-8 character.
pub fn like(s: &[u8], p: &[u8]) -> bool {
    // Iterative with backtracking to the last `%` (linear in practice, never exponential).
    let (mut si, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    let char_len = |b: u8| match b {
        b if b < 0x80 => 1,
        b if b >= 0xf0 => 4,
        b if b >= 0xe0 => 3,
        b if b >= 0xc0 => 2,
        _ => 1,
    };
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'%' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'_' => {
                    si += char_len(s[si]).min(s.len() - si);
                    pi += 1;
                    continue;
                }
                b'\\' if pi + 1 < p.len() && p[pi + 1] == s[si] => {
                    si += 1;
                    pi += 2;
                    continue;
                }
                b'\\' => {}
                c if c == s[si] => {
                    si += 1;
                    pi += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                let next = ss + char_len(s[ss]).min(s.len() - ss);
                star = Some((sp, next));
                pi = sp + 1;
                si = next;
            }
            None => return false,
        }
    }
    while pi < p.len() && p[pi] == b'%' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::like;

    #[test]
    fn like_matches_as_sql_does() {
        for (s, p, m) in [
            ("/events", "/events%", true),
            ("/events/12", "/events%", true),
            ("/event", "/events%", false),
            ("/rpc/consume_batch_quantity", "/rpc/consume_batch_quantity", true),
            (
                "/rpc/consumeXbatch_quantity",
                "/rpc/consume\\_batch_quantity",
                false,
            ),
            (
                "/rpc/consume_batch_quantity",
                "/rpc/consume\\_batch_quantity",
                true,
            ),
            ("/a/b/c", "%/b/%", true),
            ("/abc", "/a_c", true),
            ("/aéc", "/a_c", true),
            ("/ac", "/a_c", false),
            ("", "%", true),
            ("x", "", false),
            ("/50%", "/50\\%", true),
            ("/500", "/50\\%", false),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "%a%a%a%a%a%a%b", true),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "%a%a%a%a%a%a%b", false),
        ] {
            assert_eq!(like(s.as_bytes(), p.as_bytes()), m, "{s:?} LIKE {p:?}");
        }
    }
}
