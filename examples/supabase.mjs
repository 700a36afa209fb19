// quota_ext from supabase-js, against the stack scripts/demo.sh leaves running (PostgREST behind
// nginx on http://127.0.0.1:25335, JWT secret below). Run from the repository root:
//   node --experimental-default-type=module examples/supabase.mjs
// (it uses the packages of http/, installed by the demo).
import { createRequire } from 'node:module'
const require = createRequire(new URL('../http/package.json', import.meta.url))
const { createClient } = require('@supabase/supabase-js')
const { SignJWT } = require('jose')
const WebSocket = require('ws')

const url = process.env.SUPABASE_URL ?? 'http://127.0.0.1:25335'
const secret = new TextEncoder().encode(process.env.QUOTA_EXT_JWT_SECRET ?? 'quota-ext-test-secret-of-at-least-32-chars')
const sign = (claims) => new SignJWT(claims).setProtectedHeader({ alg: 'HS256' }).setExpirationTime('1h').sign(secret)

const anonKey = await sign({ role: 'anon' })
const userToken = await sign({ role: 'authenticated', sub: 'carol' })
const supabase = createClient(url, anonKey, {
  auth: { persistSession: false },
  global: { headers: { Authorization: `Bearer ${userToken}` } },
  realtime: { transport: WebSocket }
})

// Consume one API call as the signed-in user (the JWT's sub), with an idempotency key.
const first = await supabase.schema('quota').rpc('consume', { metric: 'api_calls', idempotency_key: 'req-1' })
console.log('consume:', first.status, first.data)
const retry = await supabase.schema('quota').rpc('consume', { metric: 'api_calls', idempotency_key: 'req-1' })
console.log('retry (replayed, counted once):', retry.data.replayed, retry.data.used)

// require: a denial is an error with HTTP 429.
for (let i = 0; i < 3; i++) {
  const r = await supabase.schema('quota').rpc('require', { metric: 'api_calls' })
  console.log('require:', r.status, r.error ? r.error.code : `used ${r.data.used}`)
}

// The caller's own usage rows (row level security).
const { data: usage } = await supabase.schema('quota').from('usage').select('metric, period, used')
console.log('my usage:', usage)
