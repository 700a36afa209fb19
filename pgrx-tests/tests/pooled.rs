//! Pooled quotas: organizations and their members, charged together, all or nothing, exact
//! under real concurrent sessions; parents, claims, row level security, status, refunds,
//! pooled rate policies, near_limit and the usage retention.

use quota_ext_itests::{
    as_role_with_claims, audit_rows, code, in_parallel, one_i64, one_text, sqlstate, untrusted_role_sql,
    TestDb,
};
use std::collections::HashMap;

const SESSIONS: usize = 8;

/// What the sessions saw: grants and denials per member, and any error but a denial.
#[derive(Default, Debug)]
struct Seen {
    granted: HashMap<String, i64>,
    grants: i64,
    denials: i64,
    errors: Vec<String>,
}

/// `SESSIONS` sessions, session i consuming `calls` units one at a time as member
/// `members[i % members.len()]`.
fn hammer(db: &TestDb, members: &'static [&'static str], calls: usize) -> Seen {
    let per_session = in_parallel(db, SESSIONS, move |i, c, start| {
        let member = members[i % members.len()];
        let stmt = c
            .prepare("SELECT allowed FROM quota.consume($1, 'api', 1)")
            .unwrap();
        let mut seen = Seen::default();
        start();
        for _ in 0..calls {
            match c.query_one(&stmt, &[&member]) {
                Ok(row) if row.get::<_, bool>(0) => {
                    *seen.granted.entry(member.to_string()).or_default() += 1;
                    seen.grants += 1;
                }
                Ok(_) => seen.denials += 1,
                Err(e) => seen.errors.push(e.to_string()),
            }
        }
        seen
    });
    let mut all = Seen::default();
    for s in per_session {
        for (m, n) in s.granted {
            *all.granted.entry(m).or_default() += n;
        }
        all.grants += s.grants;
        all.denials += s.denials;
        all.errors.extend(s.errors);
    }
    assert!(
        all.errors.is_empty(),
        "errors other than denials: {:?}",
        &all.errors[..all.errors.len().min(5)]
    );
    all
}

fn used(c: &mut postgres::Client, subject: &str) -> i64 {
    one_i64(
        c,
        &format!("SELECT coalesce(sum(used), 0)::bigint FROM quota.usage_totals WHERE subject = '{subject}' AND metric = 'api'"),
    )
}

/// An organization on plan `org` with a `total` limit (a window that never ends, so a run
/// across midnight still checks one window) and members capped by plan `seat`.
fn organization(c: &mut postgres::Client, org: &str, org_limit: i64, members: &[&str], cap: i64) {
    c.batch_execute(&format!(
        "INSERT INTO quota.plans VALUES ('org', 'organizations'), ('seat', 'members') ON CONFLICT DO NOTHING;
         SELECT quota.set_limit('org', 'api', 'total', {org_limit});
         SELECT quota.set_limit('seat', 'api', 'total', {cap});
         SELECT quota.set_plan('{org}', 'org');"
    ))
    .unwrap();
    for m in members {
        c.batch_execute(&format!(
            "SELECT quota.set_plan('{m}', 'seat'); SELECT quota.set_parent('{m}', '{org}');"
        ))
        .unwrap();
    }
}

#[test]
fn eight_sessions_of_four_members_grant_exactly_the_organizations_limit() {
    let db = TestDb::new("pooled_exact");
    let mut c = db.connect();
    const MEMBERS: &[&str] = &["m1", "m2", "m3", "m4"];
    // Demand: 8 sessions x 100 units, 200 per member; caps 100 each (400 in all) and the
    // organization's 300 below both.
    organization(&mut c, "acme", 300, MEMBERS, 100);

    let seen = hammer(&db, MEMBERS, 100);

    assert_eq!(
        seen.grants, 300,
        "exactly the organization's limit granted: {seen:?}"
    );
    assert_eq!(seen.denials, 500);
    assert_eq!(
        used(&mut c, "acme"),
        300,
        "the organization's usage equals the grants"
    );
    for m in MEMBERS {
        let granted = seen.granted.get(*m).copied().unwrap_or(0);
        assert!(granted <= 100, "{m} past its cap: {granted}");
        assert_eq!(used(&mut c, m), granted, "{m}'s usage equals its grants");
    }
    assert_eq!(
        audit_rows(&mut c, "action = 'consume'"),
        800,
        "one audit row per decision"
    );
    assert_eq!(audit_rows(&mut c, "action = 'consume' AND success"), 300);
    assert_eq!(
        audit_rows(
            &mut c,
            "action = 'consume' AND success AND jsonb_array_length(details -> 'chain') = 2"
        ),
        300,
        "every grant's audit row holds both levels of the chain"
    );
}

#[test]
fn chains_of_three_under_concurrency_never_pass_a_level() {
    let db = TestDb::new("pooled_depth3");
    let mut c = db.connect();
    const MEMBERS: &[&str] = &["a1", "a2", "b1", "b2"];
    c.batch_execute(
        "INSERT INTO quota.plans VALUES ('org', ''), ('team', ''), ('seat', '');
         SELECT quota.set_limit('org', 'api', 'total', 250);
         SELECT quota.set_limit('team', 'api', 'total', 150);
         SELECT quota.set_limit('seat', 'api', 'total', 90);
         SELECT quota.set_limit('seat', 'api', 'day', 1000);
         SELECT quota.set_plan('org', 'org');
         SELECT quota.set_plan('team_a', 'team'); SELECT quota.set_parent('team_a', 'org');
         SELECT quota.set_plan('team_b', 'team'); SELECT quota.set_parent('team_b', 'org');
         SELECT quota.set_plan('a1', 'seat'); SELECT quota.set_parent('a1', 'team_a');
         SELECT quota.set_plan('a2', 'seat'); SELECT quota.set_parent('a2', 'team_a');
         SELECT quota.set_plan('b1', 'seat'); SELECT quota.set_parent('b1', 'team_b');
         SELECT quota.set_plan('b2', 'seat'); SELECT quota.set_parent('b2', 'team_b');",
    )
    .unwrap();

    let seen = hammer(&db, MEMBERS, 60);

    let g = |m: &str| seen.granted.get(m).copied().unwrap_or(0);
    let (team_a, team_b) = (g("a1") + g("a2"), g("b1") + g("b2"));
    assert_eq!(seen.grants, 250, "the organization binds last: {seen:?}");
    assert!(
        team_a <= 150 && team_b <= 150,
        "a team past its limit: {team_a}, {team_b}"
    );
    assert_eq!(used(&mut c, "team_a"), team_a);
    assert_eq!(used(&mut c, "team_b"), team_b);
    assert_eq!(used(&mut c, "org"), 250);
    for m in MEMBERS {
        assert!(g(m) <= 90, "{m} past its cap");
        // Two windows per member (day and total), both moved together.
        assert_eq!(
            used(&mut c, m),
            2 * g(m),
            "{m}: all or nothing across its own periods"
        );
    }
    assert_eq!(
        audit_rows(&mut c, "action = 'consume'"),
        seen.grants + seen.denials
    );
}

#[test]
fn moving_members_between_organizations_while_they_consume_never_over_grants() {
    let db = TestDb::new("pooled_move");
    let mut c = db.connect();
    c.batch_execute(
        "INSERT INTO quota.plans VALUES ('org', '');
         SELECT quota.set_limit('org', 'api', 'total', 200);
         SELECT quota.set_plan('east', 'org');
         SELECT quota.set_plan('west', 'org');
         SELECT quota.set_parent('m1', 'east');
         SELECT quota.set_parent('m2', 'west');
         SELECT quota.set_parent('m3', 'east');",
    )
    .unwrap();
    // Six sessions consume as three members; two move them between the organizations.
    let out = in_parallel(&db, SESSIONS, |i, c, start| {
        let mut grants = 0i64;
        let mut errors = Vec::new();
        start();
        if i >= 6 {
            for n in 0..40 {
                let m = ["m1", "m2", "m3"][(n + i) % 3];
                let org = if (n + i) % 2 == 0 { "east" } else { "west" };
                if let Err(e) = c.execute("SELECT quota.set_parent($1, $2)", &[&m, &org]) {
                    errors.push(e.to_string());
                }
            }
        } else {
            let m = ["m1", "m2", "m3"][i % 3];
            for _ in 0..100 {
                match c.query_one("SELECT allowed FROM quota.consume($1, 'api')", &[&m]) {
                    Ok(r) if r.get::<_, bool>(0) => grants += 1,
                    Ok(_) => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        (grants, errors)
    });
    let errors: Vec<String> = out.iter().flat_map(|o| o.1.clone()).collect();
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
    let grants: i64 = out.iter().map(|o| o.0).sum();
    let (east, west) = (used(&mut c, "east"), used(&mut c, "west"));
    assert!(
        east <= 200 && west <= 200,
        "an organization over its limit: {east}, {west}"
    );
    assert_eq!(
        east + west,
        grants,
        "every grant charged exactly one organization"
    );
    assert!(grants > 0);
}

#[test]
fn set_parent_refuses_cycles_deep_chains_unknown_parents_and_untrusted_callers() {
    let db = TestDb::new("pooled_refusals");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_plan('a', 'free'); SELECT quota.set_plan('b', 'free');
         SELECT quota.set_plan('c', 'free'); SELECT quota.set_plan('d', 'free');
         SELECT quota.set_plan('e', 'free');
         SELECT quota.set_parent('b', 'a'); SELECT quota.set_parent('c', 'b');
         SELECT quota.set_parent('d', 'c');",
    )
    .unwrap();
    let before = one_text(
        &mut c,
        "SELECT string_agg(subject || '>' || coalesce(parent, ''), ',' ORDER BY subject) FROM quota.subjects",
    );
    let audit_before = audit_rows(&mut c, "action = 'set_parent'");
    for (sql, expected) in [
        ("SELECT quota.set_parent('a', 'a')", "42P19"),
        ("SELECT quota.set_parent('a', 'd')", "42P19"),
        ("SELECT quota.set_parent('e', 'd')", "54000"),
        // e above a: a chain e > a > b > c > d of five.
        ("SELECT quota.set_parent('a', 'e')", "54000"),
        ("SELECT quota.set_parent('e', 'nobody')", "23503"),
        ("SELECT quota.set_parent(NULL, 'a')", "22004"),
        ("SELECT quota.set_parent('e', ' ')", "22023"),
        ("SELECT quota.set_parent(repeat('x', 300), 'a')", "22001"),
    ] {
        assert_eq!(sqlstate(&mut c, sql).as_deref(), Some(expected), "{sql}");
    }
    c.batch_execute(&untrusted_role_sql("pooled_app")).unwrap();
    as_role_with_claims(&mut c, "pooled_app", r#"{"sub": "e"}"#);
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.set_parent('e', 'a')").as_deref(),
        Some("42501")
    );
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.set_parent('e', NULL)").as_deref(),
        Some("42501")
    );
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(
        one_text(&mut c, "SELECT string_agg(subject || '>' || coalesce(parent, ''), ',' ORDER BY subject) FROM quota.subjects"),
        before,
        "refusals changed nothing"
    );
    assert_eq!(audit_rows(&mut c, "action = 'set_parent'"), audit_before);
}

#[test]
fn a_hand_written_cycle_or_deep_chain_is_refused_by_consume() {
    let db = TestDb::new("pooled_hand_cycle");
    let mut c = db.connect();
    c.batch_execute(
        "SELECT quota.set_limit('free', 'api', 'day', 10);
         SELECT quota.set_plan('x', 'free'); SELECT quota.set_plan('y', 'free');
         SELECT quota.set_parent('x', 'y');
         UPDATE quota.subjects SET parent = 'x' WHERE subject = 'y';",
    )
    .unwrap();
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.consume('x', 'api')").as_deref(),
        Some("42P19")
    );
    assert_eq!(
        sqlstate(&mut c, "SELECT * FROM quota.status('y')").as_deref(),
        Some("42P19")
    );
    c.batch_execute(
        "UPDATE quota.subjects SET parent = NULL WHERE subject = 'y';
         INSERT INTO quota.subjects (subject, parent) VALUES ('l1', NULL), ('l2', 'l1'), ('l3', 'l2'), ('l4', 'l3');
         UPDATE quota.subjects SET parent = 'l4' WHERE subject = 'y';",
    )
    .unwrap();
    // x > y > l4 > l3 > l2 > l1: six.
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.consume('x', 'api')").as_deref(),
        Some("54000")
    );
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM quota.usage"),
        0,
        "nothing charged"
    );
}

#[test]
fn untrusted_members_charge_their_chain_and_cannot_name_it() {
    let db = TestDb::new("pooled_untrusted");
    let mut c = db.connect();
    organization(&mut c, "acme", 5, &["alice", "bob"], 3);
    c.batch_execute("SELECT quota.set_plan('globex', 'org')").unwrap();
    as_role_with_claims(
        &mut c,
        "authenticated",
        r#"{"sub": "alice", "role": "authenticated"}"#,
    );
    let r = c
        .query_one(
            "SELECT allowed, subject, binding_subject FROM quota.consume(NULL, 'api', 3)",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, bool>(0), r.get::<_, String>(1)),
        (true, "alice".to_string())
    );
    for sql in [
        "SELECT quota.consume('acme', 'api')",
        "SELECT quota.refund('acme', 'api')",
        "SELECT * FROM quota.status('acme')",
        "SELECT quota.set_parent('alice', 'globex')",
        "SELECT quota.set_parent('alice', NULL)",
    ] {
        assert_eq!(sqlstate(&mut c, sql).as_deref(), Some("42501"), "{sql}");
    }
    // Its status: its own window, then its organization's.
    let status = one_text(
        &mut c,
        "SELECT string_agg(format('%s:%s/%s', binding_subject, used, quota_limit), ',') FROM quota.status()",
    );
    assert_eq!(status, "alice:3/3,acme:3/5");
    // Row level security: its own and its organization's usage rows, nobody else's.
    c.batch_execute("RESET ROLE").unwrap();
    c.batch_execute("SELECT quota.consume('bob', 'api', 1); SELECT quota.consume('globex', 'api', 1);")
        .unwrap();
    as_role_with_claims(
        &mut c,
        "authenticated",
        r#"{"sub": "alice", "role": "authenticated"}"#,
    );
    assert_eq!(
        one_text(
            &mut c,
            "SELECT string_agg(subject || '=' || used, ',' ORDER BY subject) FROM quota.usage_totals"
        ),
        "acme=4,alice=3"
    );
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn a_parent_claim_pools_members_the_table_does_not_know_and_the_table_wins() {
    let db = TestDb::new("pooled_claim");
    let mut c = db.connect();
    organization(&mut c, "acme", 4, &[], 100);
    c.batch_execute(
        "SELECT quota.set_plan('globex', 'org');
         SELECT quota.set_limit('free', 'api', 'total', 100);
         SELECT quota.set_parent('tom', 'globex');",
    )
    .unwrap();
    let claims = |sub: &str, org: &str| {
        format!(r#"{{"sub": "{sub}", "role": "authenticated", "app_metadata": {{"org_id": "{org}"}}}}"#)
    };
    // Without the setting, the claim is nothing.
    as_role_with_claims(&mut c, "authenticated", &claims("ann", "acme"));
    assert_eq!(
        one_text(&mut c, "SELECT binding_subject FROM quota.consume(NULL, 'api')"),
        "ann"
    );
    c.batch_execute("RESET ROLE; SET quota_ext.parent_claim = 'app_metadata.org_id'")
        .unwrap();
    as_role_with_claims(&mut c, "authenticated", &claims("ann", "acme"));
    let r = c
        .query_one(
            "SELECT used, binding_subject FROM quota.consume(NULL, 'api', 3)",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, String>(1)),
        (3, "acme".to_string()),
        "charged to the claimed organization"
    );
    assert!(!c
        .query_one("SELECT allowed FROM quota.consume(NULL, 'api', 2)", &[])
        .unwrap()
        .get::<_, bool>(0));
    // The table's parent wins over a claim that contradicts it.
    as_role_with_claims(&mut c, "authenticated", &claims("tom", "acme"));
    assert_eq!(
        one_text(
            &mut c,
            "SELECT binding_subject FROM quota.consume(NULL, 'api', 1)"
        ),
        "globex"
    );
    // A claim naming no subject of quota.subjects names no parent.
    as_role_with_claims(&mut c, "authenticated", &claims("sue", "initech"));
    assert_eq!(
        one_text(
            &mut c,
            "SELECT binding_subject FROM quota.consume(NULL, 'api', 1)"
        ),
        "sue"
    );
    // An ordinary role cannot turn the setting off to leave its organization.
    assert_eq!(
        sqlstate(&mut c, "SET quota_ext.parent_claim = ''").as_deref(),
        Some("42501")
    );
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(used(&mut c, "acme"), 3);
    assert_eq!(used(&mut c, "globex"), 1);
    // A claim that is there but cannot name a parent is refused, not ignored (ignoring it would
    // charge the member alone, outside its organization's quota).
    for (claim, expected) in [
        ("42.5", "22023"),
        ("[1]", "22023"),
        ("\"\"", "22023"),
        (&format!("\"{}\"", "o".repeat(300)), "22001"),
    ] {
        as_role_with_claims(
            &mut c,
            "authenticated",
            &format!(r#"{{"sub": "bad", "role": "authenticated", "app_metadata": {{"org_id": {claim}}}}}"#),
        );
        assert_eq!(
            sqlstate(&mut c, "SELECT quota.consume(NULL, 'api')").as_deref(),
            Some(expected),
            "{claim}"
        );
    }
    // An integer names the subject of its digits.
    c.batch_execute("RESET ROLE; SELECT quota.set_plan('4242', 'org')")
        .unwrap();
    as_role_with_claims(
        &mut c,
        "authenticated",
        r#"{"sub": "num", "role": "authenticated", "app_metadata": {"org_id": 4242}}"#,
    );
    assert_eq!(
        one_text(
            &mut c,
            "SELECT binding_subject FROM quota.consume(NULL, 'api', 4)"
        ),
        "4242"
    );
    // A claim users write themselves cannot name a parent.
    c.batch_execute("RESET ROLE; SET quota_ext.parent_claim = 'user_metadata.org_id'")
        .unwrap();
    as_role_with_claims(&mut c, "authenticated", &claims("ann", "acme"));
    assert_eq!(
        sqlstate(&mut c, "SELECT quota.consume(NULL, 'api')").as_deref(),
        Some("22023")
    );
    c.batch_execute("RESET ROLE; SET quota_ext.parent_claim = 'app_metadata.org_id'")
        .unwrap();
    // Detaching a member whose JWT names its organization detaches it: the claim no longer
    // counts, until set_parent attaches it again.
    c.batch_execute("SELECT quota.set_parent('ann', NULL)").unwrap();
    as_role_with_claims(&mut c, "authenticated", &claims("ann", "acme"));
    assert_eq!(
        one_text(
            &mut c,
            "SELECT binding_subject FROM quota.consume(NULL, 'api', 0)"
        ),
        "ann"
    );
    assert_eq!(one_text(&mut c, "SELECT quota.own_chain()::text"), "{ann}");
    c.batch_execute("RESET ROLE; SELECT quota.set_parent('ann', 'globex')")
        .unwrap();
    as_role_with_claims(&mut c, "authenticated", &claims("ann", "acme"));
    assert_eq!(one_text(&mut c, "SELECT quota.own_chain()::text"), "{ann,globex}");
    c.batch_execute("RESET ROLE; SELECT quota.set_parent('ann', NULL)")
        .unwrap();
    // A trusted caller acting for ann does not lend her its own claim.
    c.batch_execute(&format!(
        "SELECT set_config('request.jwt.claims', '{}', false)",
        claims("svc", "globex")
    ))
    .unwrap();
    assert_eq!(
        one_text(
            &mut c,
            "SELECT binding_subject FROM quota.consume('ann', 'api', 1)"
        ),
        "ann"
    );
}

#[test]
fn refunds_replays_and_require_follow_the_chain() {
    let db = TestDb::new("pooled_refund");
    let mut c = db.connect();
    organization(&mut c, "acme", 10, &["alice"], 8);
    as_role_with_claims(
        &mut c,
        "authenticated",
        r#"{"sub": "alice", "role": "authenticated"}"#,
    );
    let first = c
        .query_one(
            "SELECT allowed, used FROM quota.consume(NULL, 'api', 4, 'order-1')",
            &[],
        )
        .unwrap();
    assert!(first.get::<_, bool>(0));
    let replay = c
        .query_one(
            "SELECT replayed, binding_subject FROM quota.consume(NULL, 'api', 4, 'order-1')",
            &[],
        )
        .unwrap();
    assert_eq!(
        (replay.get::<_, bool>(0), replay.get::<_, String>(1)),
        (true, "alice".to_string())
    );
    // The member's key covers the whole charge: its refund gives back at every level.
    c.query_one("SELECT quota.refund(NULL, 'api', 4, 'order-1')", &[])
        .unwrap();
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!((used(&mut c, "alice"), used(&mut c, "acme")), (0, 0));
    // A trusted refund of the current windows gives back at every level too.
    c.batch_execute("SELECT quota.consume('alice', 'api', 6); SELECT quota.refund('alice', 'api', 2);")
        .unwrap();
    assert_eq!((used(&mut c, "alice"), used(&mut c, "acme")), (4, 4));
    // require's denial names the window that binds.
    c.batch_execute("SELECT quota.set_parent('bob', 'acme'); SELECT quota.consume('bob', 'api', 6)")
        .unwrap();
    let e = c
        .batch_execute("SELECT quota.require('alice', 'api', 1)")
        .unwrap_err();
    assert_eq!(code(&e), "PT429");
    let db_err = e.as_db_error().unwrap();
    assert!(
        db_err.message().contains("for subject acme"),
        "{}",
        db_err.message()
    );
    assert!(db_err.detail().unwrap().contains(r#""binding_subject":"acme""#));
    // A detached member is alone again.
    c.batch_execute("SELECT quota.set_parent('alice', NULL)").unwrap();
    assert_eq!(
        one_text(
            &mut c,
            "SELECT binding_subject FROM quota.consume('alice', 'api', 1)"
        ),
        "alice"
    );
    assert_eq!(used(&mut c, "acme"), 10);
}

#[test]
fn a_pooled_rate_policy_limits_an_organization_as_one() {
    let db = TestDb::new("pooled_rate");
    let mut c = db.connect();
    organization(&mut c, "acme", 100, &["m1", "m2", "m3"], 100);
    c.batch_execute(
        "INSERT INTO quota.rate_policies (policy, plan, rate, per, pooled) VALUES
             ('api', 'seat', 100, '1 hour', true),
             ('api', 'org', 5, '1 hour', false),
             ('solo', 'seat', 2, '1 hour', false);",
    )
    .unwrap();
    let mut allowed = 0;
    for i in 0..12 {
        let m = ["m1", "m2", "m3"][i % 3];
        as_role_with_claims(
            &mut c,
            "authenticated",
            &format!(r#"{{"sub": "{m}", "role": "authenticated"}}"#),
        );
        let r = c
            .query_one("SELECT allowed, key FROM quota.rate_limit('api')", &[])
            .unwrap();
        assert_eq!(r.get::<_, String>(1), "acme", "the organization's bucket");
        allowed += r.get::<_, bool>(0) as i32;
        // Naming its own key does not get a member out of the pool.
        let own = c
            .query_one(&format!("SELECT key FROM quota.rate_limit('api', '{m}', 0)"), &[])
            .unwrap();
        assert_eq!(own.get::<_, String>(0), "acme");
    }
    assert_eq!(allowed, 5, "the organization's burst, whichever member spends it");
    // Pooled by the organization's row alone: the members' plan row does not say so.
    c.batch_execute(
        "RESET ROLE;
         INSERT INTO quota.rate_policies (policy, plan, rate, per, pooled) VALUES
             ('org-only', 'seat', 100, '1 hour', false),
             ('org-only', 'org', 2, '1 hour', true);",
    )
    .unwrap();
    let mut allowed = 0;
    for m in ["m1", "m2", "m3"] {
        as_role_with_claims(
            &mut c,
            "authenticated",
            &format!(r#"{{"sub": "{m}", "role": "authenticated"}}"#),
        );
        let r = c
            .query_one("SELECT allowed, key FROM quota.rate_limit('org-only')", &[])
            .unwrap();
        assert_eq!(r.get::<_, String>(1), "acme");
        allowed += r.get::<_, bool>(0) as i32;
    }
    assert_eq!(allowed, 2, "the organization's row: 2 for all its members");
    // A policy that is not pooled keeps a bucket per member.
    as_role_with_claims(
        &mut c,
        "authenticated",
        r#"{"sub": "m1", "role": "authenticated"}"#,
    );
    assert_eq!(one_text(&mut c, "SELECT key FROM quota.rate_limit('solo')"), "m1");
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn near_limit_reports_organizations_and_prune_keeps_current_windows() {
    let db = TestDb::new("pooled_near");
    let mut c = db.connect();
    organization(&mut c, "acme", 10, &["alice"], 100);
    c.batch_execute(
        "SELECT quota.set_limit('org', 'api', 'day', 10);
         SELECT quota.consume('alice', 'api', 9);
         -- History: old windows of every period but total.
         INSERT INTO quota.usage
         SELECT 'acme', 'api', p, date_trunc(p, now() - ('3 ' || p)::interval), 10
           FROM unnest('{minute,hour,day,week,month,year}'::text[]) AS p;",
    )
    .unwrap();
    let near = one_text(
        &mut c,
        "SELECT string_agg(format('%s %s %s/%s', subject, period, used, quota_limit), ',') FROM quota.near_limit(0.8)",
    );
    assert_eq!(
        near, "acme day 9/10,acme total 9/10",
        "organizations reported, old windows not"
    );
    assert_eq!(
        sqlstate(&mut c, "SELECT * FROM quota.prune(NULL, NULL, '-1 day')").as_deref(),
        Some("22023")
    );
    let rows_before = one_i64(&mut c, "SELECT count(*) FROM quota.usage");
    assert_eq!(
        one_i64(&mut c, "SELECT usage_deleted FROM quota.prune(NULL, NULL)"),
        0,
        "usage kept by default"
    );
    assert_eq!(
        one_i64(
            &mut c,
            "SELECT usage_deleted FROM quota.prune(NULL, NULL, '0 seconds')"
        ),
        6
    );
    assert_eq!(
        one_i64(&mut c, "SELECT count(*) FROM quota.usage"),
        rows_before - 6
    );
    // The current windows are still there and still count.
    assert_eq!(used(&mut c, "alice"), 9);
    assert_eq!(
        one_i64(&mut c, "SELECT used FROM quota.consume('alice', 'api', 0) "),
        9
    );
}
