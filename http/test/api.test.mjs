// Every function of the API through supabase.schema('quota').rpc(...), as service_role,
// authenticated and anon: each answer's status and JSON.
import { test, before } from 'node:test'
import assert from 'node:assert/strict'
import { client, sql, unique } from './stack.mjs'

let service, user, anon, sub
before(async () => {
  sub = unique('api-user')
  service = await client('service_role')
  user = await client('authenticated', sub)
  anon = await client('anon')
  sql("SELECT quota.set_limit('free', 'api_calls', 'day', 1000)")
})

// What PostgREST answers for a SQLSTATE (docs/supabase.md has the table).
// (A function returning void answers 204 No Content.)
const DENIED = { service_role: [200, 204], authenticated: 403, anon: 401 }
const callers = () => ({ service_role: service, authenticated: user, anon })

// What a 200 answer of each function looks like in JSON.
const DECISION = ['allowed', 'subject', 'metric', 'period', 'used', 'quota_limit', 'remaining', 'reset_at', 'retry_after_seconds', 'replayed', 'binding_subject']
const RATE = ['allowed', 'key', 'rate_limit', 'remaining', 'reset_after_seconds', 'retry_after_seconds']
const has = (keys) => (o) => o !== null && typeof o === 'object' && keys.every((k) => k in o)
const rows = (keys) => (a) => Array.isArray(a) && a.every(has(keys))
const SHAPES = {
  consume: has(DECISION),
  require_decision: has(DECISION),
  refund: has(DECISION),
  status: rows(DECISION),
  audit_page: rows(['id', 'subject', 'action', 'success', 'reason', 'details']),
  rate_limit: has(RATE),
  request_rate_decision: (d) => d === null || has(RATE)(d),
  request_rate_limit: (d) => d === null || (Array.isArray(d) && d.length === 2),
  rate_check: has(RATE),
  rate_reset: (d) => typeof d === 'boolean',
  reset_usage: (d) => typeof d === 'number',
  near_limit: rows(['subject', 'metric', 'period', 'used', 'quota_limit', 'ratio']),
  prune: (d) => has(['audit_deleted', 'idempotency_deleted'])(Array.isArray(d) ? d[0] : d),
  create_batch: has(['id', 'owner', 'item', 'quantity', 'version']),
  metrics: rows(['name', 'value', 'description']),
  metrics_prometheus: (d) => typeof d === 'string' && d.includes('quota_ext_'),
  consume_batch_quantity: rows(['batch_id', 'consumed', 'remaining', 'version']),
  take_batch_quantity: rows(['batch_id', 'consumed', 'remaining', 'version']),
  consume_item: rows(['batch_id', 'consumed', 'remaining', 'version']),
  window_bounds: rows(['window_start', 'reset_at']),
  set_plan: () => true,
  set_parent: () => true,
  breaker_allow: has(['allowed', 'name', 'state', 'failures', 'retry_after_seconds']),
  breaker_record: has(['allowed', 'name', 'state', 'failures', 'retry_after_seconds']),
  breaker_reset: has(['allowed', 'name', 'state', 'failures', 'retry_after_seconds']),
  upstream_observe: has(['allowed', 'api', 'remaining', 'reset_at', 'retry_after_seconds']),
  upstream_acquire: has(['allowed', 'api', 'remaining', 'reset_at', 'retry_after_seconds']),
  health: rows(['check', 'ok', 'detail']),
  latency: rows(['function', 'calls', 'mean_ms', 'p50_ms', 'p95_ms', 'p99_ms']),
  own_chain: (d) => d === null || (Array.isArray(d) && d.every((s) => typeof s === 'string')),
  set_limit: () => true,
  set_override: () => true,
  pre_request: () => true,
  reset_metrics: () => true,
  invalidate_cache: () => true,
  citus_layout: rows(['step', 'table_name', 'kind', 'distribution_column', 'command'])
}

test('the quota functions answer each role as its grants and the trust rules say', async () => {
  const batch = (await service.schema('quota').rpc('create_batch', { owner: sub, item: 'milk', quantity: 10 })).data
  const cases = [
    // [function, arguments per role (a function of the role), expected status per role]
    ['consume', (r) => ({ subject: r === 'service_role' ? sub : null, metric: 'api_calls', amount: 1 }), { service_role: 200, authenticated: 200, anon: 401 }],
    ['require_decision', (r) => ({ subject: r === 'service_role' ? sub : null, metric: 'api_calls', amount: 1 }), { service_role: 200, authenticated: 200, anon: 401 }],
    ['status', (r) => ({ subject: r === 'service_role' ? sub : null }), { service_role: 200, authenticated: 200, anon: 401 }],
    ['audit_page', (r) => ({ subject: r === 'service_role' ? sub : null }), { service_role: 200, authenticated: 200, anon: 401 }],
    ['rate_limit', () => ({ policy: 'default' }), { service_role: 200, authenticated: 200, anon: 200 }],
    ['request_rate_decision', () => ({ method: 'POST' }), { service_role: 200, authenticated: 200, anon: 200 }],
    ['set_plan', () => ({ subject: unique('planned'), plan: 'pro' }), DENIED],
    ['set_parent', () => ({ subject: unique('member'), parent: null }), DENIED],
    ['breaker_allow', () => ({ name: unique('svc') }), { service_role: 200, authenticated: 403, anon: 401 }],
    ['breaker_record', () => ({ name: unique('svc'), success: false }), { service_role: 200, authenticated: 403, anon: 401 }],
    ['breaker_reset', () => ({ name: unique('svc') }), { service_role: 200, authenticated: 403, anon: 401 }],
    ['upstream_observe', () => ({ api: unique('api'), quota_limit: 5000, remaining: 10, reset_at: '2126-01-01T00:00:00Z' }), { service_role: 200, authenticated: 403, anon: 401 }],
    ['upstream_acquire', () => ({ api: unique('api') }), { service_role: 200, authenticated: 403, anon: 401 }],
    ['health', () => ({}), DENIED],
    ['latency', () => ({}), DENIED],
    ['own_chain', () => ({}), { service_role: 200, authenticated: 200, anon: 401 }],
    ['set_limit', () => ({ plan: 'pro', metric: unique('m'), period: 'day', max_amount: 5 }), DENIED],
    ['set_override', () => ({ subject: sub, metric: unique('m'), period: 'day', max_amount: 5 }), DENIED],
    ['reset_usage', () => ({ subject: unique('nobody'), metric: 'api_calls' }), DENIED],
    ['near_limit', () => ({ threshold: 0.9 }), DENIED],
    ['prune', () => ({ audit_older_than: '10 years', idempotency_older_than: '10 years' }), DENIED],
    ['rate_check', () => ({ key: unique('k'), rate: 10, per: '1 second' }), DENIED],
    ['rate_reset', () => ({ key: unique('k') }), DENIED],
    ['create_batch', () => ({ owner: unique('o'), item: 'x', quantity: 1 }), DENIED],
    ['metrics', () => ({}), DENIED],
    ['metrics_prometheus', () => ({}), DENIED],
    ['consume_batch_quantity', () => ({ p_batch_id: batch.id, p_quantity_to_consume: 1 }), { service_role: 200, authenticated: 200, anon: 401 }],
    ['consume_item', (r) => ({ owner: sub, item: 'milk', quantity: 1 }), { service_role: 200, authenticated: 200, anon: 401 }],
    ['take_batch_quantity', () => ({ p_batch_id: batch.id, p_quantity_to_consume: 1 }), { service_role: 200, authenticated: 200, anon: 401 }],
    ['refund', (r) => ({ subject: r === 'service_role' ? sub : null, metric: 'api_calls', amount: 1 }), { service_role: 200, authenticated: 403, anon: 401 }],
    ['window_bounds', () => ({ period: 'week', time_zone: 'UTC', at_time: '2026-11-22T12:00:00Z' }), DENIED],
    ['request_rate_limit', () => ({ method: 'GET' }), { service_role: 200, authenticated: 200, anon: 200 }],
    ['pre_request', () => ({}), { service_role: 204, authenticated: 204, anon: 204 }],
    ['reset_metrics', () => ({}), DENIED],
    ['invalidate_cache', () => ({}), DENIED],
    ['citus_layout', () => ({}), DENIED],
    // DDL on the tables: their owner's alone, not service_role's.
    ['citus_prepare', () => ({}), { service_role: 403, authenticated: 403, anon: 401 }]
  ]
  // Every function of the schema is called here, but require (its own test below).
  const all = sql(`SELECT string_agg(p.proname, ',' ORDER BY p.proname) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE n.nspname = 'quota' AND p.prorettype <> 'trigger'::regtype`).split(',')
  assert.deepEqual(all.filter((f) => f !== 'require' && !cases.some(([name]) => name === f)), [], 'functions not called over HTTP')
  for (const [fn, args, expected] of cases) {
    for (const [role, c] of Object.entries(callers())) {
      const { status, error, data } = await c.schema('quota').rpc(fn, args(role))
      assert.ok([expected[role]].flat().includes(status), `${fn} as ${role}: ${status} ${JSON.stringify(error ?? data)}`)
      if (expected[role] === 403 || expected[role] === 401) assert.equal(error.code, '42501', `${fn} as ${role}`)
      if (status === 200) assert.ok(SHAPES[fn](data), `${fn} as ${role} answered ${JSON.stringify(data)}`)
    }
  }
})

test('a member spends its organization\'s quota and reads its usage', async () => {
  const org = unique('org')
  const member = unique('member')
  sql(`INSERT INTO quota.plans VALUES ('http-team', '') ON CONFLICT DO NOTHING;
       SELECT quota.set_limit('http-team', 'seats_api', 'day', 3);
       SELECT quota.set_plan('${org}', 'http-team');
       SELECT quota.set_parent('${member}', '${org}');
       SELECT quota.set_limit('free', 'seats_api', 'day', 10);`)
  const m = await client('authenticated', member)
  const first = await m.schema('quota').rpc('consume', { metric: 'seats_api', amount: 2 })
  assert.equal(first.status, 200)
  assert.equal(first.data.subject, member)
  assert.equal(first.data.binding_subject, org)
  assert.equal(first.data.remaining, 1)
  const denied = await m.schema('quota').rpc('consume', { metric: 'seats_api', amount: 2 })
  assert.equal(denied.data.allowed, false)
  assert.equal(denied.data.binding_subject, org)
  const named = await m.schema('quota').rpc('consume', { subject: org, metric: 'seats_api' })
  assert.equal(named.status, 403)
  const status = await m.schema('quota').rpc('status', {})
  assert.deepEqual(status.data.filter((d) => d.metric === 'seats_api').map((d) => [d.binding_subject, d.used]), [[member, 2], [org, 2]])
  const chain = await m.schema('quota').rpc('own_chain', {})
  assert.deepEqual(chain.data, [member, org])
  const usage = await m.schema('quota').from('usage').select('subject, used').eq('metric', 'seats_api').order('subject')
  assert.equal(usage.status, 200)
  assert.deepEqual(usage.data.map((r) => r.subject).sort(), [member, org].sort())
})

test('a consume answers the decision as JSON', async () => {
  const { status, data } = await user.schema('quota').rpc('consume', { metric: 'api_calls', amount: 2 })
  assert.equal(status, 200)
  assert.equal(data.allowed, true)
  assert.equal(data.subject, sub)
  assert.equal(data.metric, 'api_calls')
  assert.equal(data.period, 'day')
  assert.equal(data.quota_limit, 1000)
  assert.equal(data.remaining, 1000 - data.used)
  assert.equal(data.replayed, false)
  assert.match(data.reset_at, /^\d{4}-\d\d-\d\dT00:00:00\+00:00$/)
})

test('refusals reach HTTP clients with their SQLSTATE and a status', async () => {
  const cases = [
    // SQLSTATE, HTTP status, the call
    ['42501', 403, () => user.schema('quota').rpc('consume', { subject: 'someone-else', metric: 'api_calls' })],
    ['42704', 400, () => user.schema('quota').rpc('consume', { metric: 'no_such_metric' })],
    ['22023', 400, () => user.schema('quota').rpc('consume', { metric: 'api_calls', amount: -1 })],
    ['22004', 400, () => service.schema('quota').rpc('consume', { metric: 'api_calls' })],
    ['P0002', 404, () => user.schema('quota').rpc('consume_batch_quantity', { p_batch_id: '00000000-0000-0000-0000-000000000000', p_quantity_to_consume: 1 })],
    ['23514', 400, () => user.schema('quota').rpc('consume_item', { owner: sub, item: 'nothing-here', quantity: 1 })]
  ]
  for (const [code, status, call] of cases) {
    const r = await call()
    assert.equal(r.error?.code, code, JSON.stringify(r.error))
    assert.equal(r.status, status, `${code}: ${JSON.stringify(r.error)}`)
  }
})

test('require answers 429 with the decision when denied', async () => {
  const metric = unique('req')
  sql(`SELECT quota.set_limit('free', '${metric}', 'day', 1)`)
  const ok = await user.schema('quota').rpc('require', { metric })
  assert.equal(ok.status, 200)
  assert.equal(ok.data.allowed, true)
  const denied = await user.schema('quota').rpc('require', { metric })
  assert.equal(denied.status, 429)
  assert.equal(denied.error.code, 'PT429')
  assert.equal(JSON.parse(denied.error.details).allowed, false)
})

test('consume with an idempotency key, retried, counts once', async () => {
  const metric = unique('idem')
  sql(`SELECT quota.set_limit('free', '${metric}', 'day', 10)`)
  const key = unique('request')
  const first = await user.schema('quota').rpc('consume', { metric, amount: 3, idempotency_key: key })
  const retry = await user.schema('quota').rpc('consume', { metric, amount: 3, idempotency_key: key })
  assert.equal(first.data.used, 3)
  assert.equal(retry.data.used, 3)
  assert.equal(retry.data.replayed, true)
  assert.equal(sql(`SELECT used FROM quota.usage_totals WHERE subject = '${sub}' AND metric = '${metric}'`), '3')
})

test('the seed\'s batch call, as written, and its version conflict', async () => {
  const { data: batch } = await service.schema('quota').rpc('create_batch', { owner: sub, item: 'eggs', quantity: 5 })
  const p_batch_id = batch.id
  const taken = await user.schema('quota').rpc('consume_batch_quantity', { p_batch_id, p_quantity_to_consume: 2 })
  assert.equal(taken.status, 200, JSON.stringify(taken.error))
  const row = Array.isArray(taken.data) ? taken.data[0] : taken.data
  assert.equal(row.remaining, 3)
  assert.equal(row.version, 2)
  const stale = await user.schema('quota').rpc('consume_batch_quantity', { p_batch_id, p_quantity_to_consume: 1, p_expected_version: 1 })
  assert.equal(stale.error?.code, '40001', JSON.stringify(stale.error))
  assert.equal(stale.status, 409, 'a version conflict is a conflict for an HTTP client')
  const tooMuch = await user.schema('quota').rpc('consume_batch_quantity', { p_batch_id, p_quantity_to_consume: 4 })
  assert.equal(tooMuch.error?.code, '23514')
})

test('row level security through .from(...).select(), and direct writes refused', async () => {
  const other = await client('authenticated', unique('other'))
  await other.schema('quota').rpc('consume', { metric: 'api_calls' })
  await user.schema('quota').rpc('consume', { metric: 'api_calls' })
  const mine = await user.schema('quota').from('usage').select('subject, metric, used')
  assert.equal(mine.status, 200)
  assert.ok(mine.data.length > 0)
  assert.ok(mine.data.every((r) => r.subject === sub), JSON.stringify(mine.data))
  const none = await anon.schema('quota').from('usage').select()
  assert.ok(none.status === 401 || (none.status === 200 && none.data.length === 0), JSON.stringify(none))
  for (const c of [user, service]) {
    const write = await c.schema('quota').from('usage').insert({ subject: sub, metric: 'api_calls', period: 'day', window_start: '2026-01-01T00:00:00Z', used: -100 })
    assert.equal(write.error?.code, '42501', JSON.stringify(write.error))
    const update = await c.schema('quota').from('usage').update({ used: 0 }).eq('subject', sub)
    assert.equal(update.error?.code, '42501', JSON.stringify(update.error))
  }
})
