// Exactness over HTTP: 200 requests of one user at once against a limit of 50 grant exactly 50,
// through PostgREST directly on PostgreSQL and through pgbouncer in transaction mode.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { client, sql, unique, GATEWAY, GATEWAY_VIA_BOUNCER } from './stack.mjs'

for (const [name, url] of [['PostgreSQL', GATEWAY], ['pgbouncer (transaction mode)', GATEWAY_VIA_BOUNCER]]) {
  test(`200 concurrent consumes of one user against a limit of 50 grant exactly 50, through ${name}`, async () => {
    const sub = unique('exact')
    const metric = unique('exact-metric')
    sql(`SELECT quota.set_limit('free', '${metric}', 'day', 50)`)
    const user = await client('authenticated', sub, url)
    const answers = await Promise.all(Array.from({ length: 200 }, () => user.schema('quota').rpc('consume', { metric })))
    const errors = answers.filter((a) => a.error)
    assert.deepEqual(errors.map((e) => e.error), [], 'no error, only decisions')
    assert.equal(answers.filter((a) => a.data.allowed).length, 50)
    assert.equal(sql(`SELECT used FROM quota.usage_totals WHERE subject = '${sub}' AND metric = '${metric}'`), '50')
    assert.equal(sql(`SELECT count(*) FROM quota.audit_log WHERE subject = '${sub}' AND metric = '${metric}'`), '200',
      'one audit row per decision')
  })
}
