// The pre-request hook (db-pre-request = quota.pre_request) through PostgREST and nginx: the
// rate-limit headers on every answer, GET and POST; 429 with Retry-After once spent; anonymous
// callers keyed by the address nginx appends; trusted callers never limited.
import { test, before } from 'node:test'
import assert from 'node:assert/strict'
import { request, rpc, anonKey, serviceKey, userToken, sql, unique } from './stack.mjs'

before(() => sql("SELECT quota.set_limit('free', 'api_calls', 'day', 1000000)"))

const RATE_HEADERS = ['ratelimit', 'ratelimit-policy', 'ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset', 'x-ratelimit-limit', 'x-ratelimit-remaining', 'x-ratelimit-reset']

test('every answer carries the rate-limit headers, GET and POST', async () => {
  const token = await userToken(unique('headers'))
  const apikey = await anonKey()
  const get = await request({ path: '/rest/v1/notes?select=id', headers: { apikey, Authorization: `Bearer ${token}` } })
  assert.equal(get.status, 200)
  const post = await rpc('consume', { metric: 'api_calls' }, { token })
  assert.equal(post.status, 200)
  for (const r of [get, post]) {
    for (const h of RATE_HEADERS) assert.ok(r.headers[h] !== undefined, `${h} in ${JSON.stringify(r.headers)}`)
  }
  // The draft's structured fields: the policy quoted, its quota and window; what remains and
  // when the bucket is full again.
  assert.match(post.headers['ratelimit-policy'], /^"(write|default)";q=1000000;w=60$/)
  assert.match(post.headers.ratelimit, /^"(write|default)";r=\d+;t=\d+$/)
  assert.equal(post.headers.ratelimit.match(/r=(\d+)/)[1], post.headers['ratelimit-remaining'])
  // Browsers show scripts only the headers listed here: PostgREST's own, and ours.
  const exposed = post.headers['access-control-expose-headers'].split(', ')
  for (const h of ['Content-Range', 'Content-Type', 'Location', 'RateLimit', 'RateLimit-Policy', 'RateLimit-Remaining', 'X-RateLimit-Reset', 'Retry-After']) {
    assert.ok(exposed.includes(h), `${h} in ${exposed}`)
  }
})

test('quota_ext.rate_limit_headers picks the draft fields, the older ones, or both', () => {
  const names = (kind) => {
    const out = sql(`SET quota_ext.rate_limit_headers = '${kind}'; ` +
      `SELECT set_config('request.jwt.claims', '{"sub": "${unique('kinds')}", "role": "authenticated"}', false); ` +
      'SET ROLE authenticated; SELECT quota.request_rate_limit(\'POST\'); SELECT current_setting(\'response.headers\')').split('\n').pop()
    return JSON.parse(out).map((h) => Object.keys(h)[0]).filter((n) => n !== 'Access-Control-Expose-Headers')
  }
  assert.deepEqual(names('draft'), ['RateLimit-Policy', 'RateLimit'])
  assert.deepEqual(names('legacy'), ['RateLimit-Limit', 'RateLimit-Remaining', 'RateLimit-Reset', 'X-RateLimit-Limit', 'X-RateLimit-Remaining', 'X-RateLimit-Reset'])
  assert.deepEqual(names('both'), [...names('draft'), ...names('legacy')])
})

test('a spent bucket answers 429 with Retry-After, and nothing of the request runs', async () => {
  const subject = unique('tiny')
  sql(`SELECT quota.set_plan('${subject}', 'tiny')`)
  sql("SELECT quota.set_limit('tiny', 'api_calls', 'day', 1000)")
  const token = await userToken(subject)
  const answers = []
  for (let i = 0; i < 5; i++) answers.push(await rpc('consume', { metric: 'api_calls' }, { token }))
  assert.deepEqual(answers.map((a) => a.status), [200, 200, 200, 429, 429])
  const denied = answers[3]
  assert.equal(denied.body.code, 'PT429')
  assert.ok(Number(denied.headers['retry-after']) >= 1, JSON.stringify(denied.headers))
  assert.equal(denied.headers['ratelimit-remaining'], '0')
  assert.equal(denied.headers['x-ratelimit-remaining'], '0', 'the 429 carries the X-RateLimit fields too')
  assert.match(denied.headers.ratelimit, /^"default";r=0;t=\d+$/)
  assert.equal(sql(`SELECT sum(used) FROM quota.usage_totals WHERE subject = '${subject}' AND metric = 'api_calls'`), '3',
    'the denied requests consumed nothing')
})

test('anonymous callers are keyed by the address nginx appends, whatever X-Forwarded-For they send', async () => {
  sql("UPDATE quota.rate_policies SET rate = 2 WHERE policy = 'default' AND plan = 'anonymous'")
  try {
    const apikey = await anonKey()
    const call = (from, spoof) => request({
      method: 'POST',
      path: '/rest/v1/rpc/rate_limit',
      headers: { apikey, Authorization: `Bearer ${apikey}`, 'Content-Type': 'application/json', 'Content-Profile': 'quota', ...(spoof ? { 'X-Forwarded-For': spoof } : {}) },
      body: { policy: 'default', cost: 0 },
      from
    })
    // Two addresses, two requests each: all pass; the third of one address is refused, even
    // when it claims another address.
    const a = `127.0.${Math.floor(Math.random() * 200) + 20}.${Math.floor(Math.random() * 200) + 20}`
    const b = `127.1.${Math.floor(Math.random() * 200) + 20}.${Math.floor(Math.random() * 200) + 20}`
    assert.deepEqual([(await call(a)).status, (await call(a)).status, (await call(b)).status, (await call(b)).status], [200, 200, 200, 200])
    const spoofed = await call(a, '198.51.100.7')
    assert.equal(spoofed.status, 429, 'a client cannot choose its address')
  } finally {
    sql("UPDATE quota.rate_policies SET rate = 1000000 WHERE policy = 'default' AND plan = 'anonymous'")
  }
})

test('trusted callers are never limited', async () => {
  sql("UPDATE quota.rate_policies SET rate = 1 WHERE policy = 'default' AND plan = 'anonymous'")
  try {
    const token = await serviceKey()
    for (let i = 0; i < 10; i++) {
      const r = await rpc('metrics', {}, { token })
      assert.equal(r.status, 200)
      assert.equal(r.headers['ratelimit-limit'], undefined, 'no bucket for a trusted caller')
    }
  } finally {
    sql("UPDATE quota.rate_policies SET rate = 1000000 WHERE policy = 'default' AND plan = 'anonymous'")
  }
})
