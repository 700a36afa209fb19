// What every HTTP test shares: the stack's addresses (from scripts/test.sh), JWTs signed with the
// stack's secret, supabase-js clients for a role, raw requests from a chosen source address, and
// psql for the set-up a test needs.
import { createClient } from '@supabase/supabase-js'
import { SignJWT } from 'jose'
import WebSocket from 'ws'
import { execFileSync } from 'node:child_process'
import http from 'node:http'

const env = (name) => {
  const v = process.env[name]
  if (!v) throw new Error(`${name} is not set: run the HTTP tests through scripts/test.sh`)
  return v
}

/** The gateway (nginx), as a Supabase project's URL: supabase-js appends /rest/v1. */
export const GATEWAY = env('QUOTA_EXT_HTTP_URL')
/** The same, with pgbouncer (transaction mode) between PostgREST and PostgreSQL. */
export const GATEWAY_VIA_BOUNCER = env('QUOTA_EXT_HTTP_BOUNCER_URL')
/** Another origin, serving http/www, for the browser test. */
export const PAGE = env('QUOTA_EXT_HTTP_PAGE_URL')
const SECRET = new TextEncoder().encode(env('QUOTA_EXT_JWT_SECRET'))

export async function jwt (claims) {
  return new SignJWT(claims).setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
    .setIssuedAt().setExpirationTime('1h').sign(SECRET)
}

export const anonKey = () => jwt({ role: 'anon' })
export const serviceKey = () => jwt({ role: 'service_role' })
export const userToken = (sub, extra = {}) => jwt({ role: 'authenticated', sub, ...extra })

/**
 * A supabase-js client as a project's users make it: the anon key as apikey, and for a user its
 * access token. role: 'service_role' | 'authenticated' | 'anon'.
 */
export async function client (role, sub = 'user-1', url = GATEWAY) {
  const key = role === 'service_role' ? await serviceKey() : await anonKey()
  const headers = role === 'authenticated' ? { Authorization: `Bearer ${await userToken(sub)}` } : {}
  return createClient(url, key, {
    auth: { persistSession: false, autoRefreshToken: false },
    global: { headers },
    realtime: { transport: WebSocket }
  })
}

/**
 * A raw request through the gateway, from `from` (a loopback address: 127.0.0.1 to 127.255.255.254
 * all reach nginx), so that tests control the peer address nginx appends to X-Forwarded-For.
 * Resolves to { status, headers, body }.
 */
export function request ({ method = 'GET', path, headers = {}, body, from = '127.0.0.1', url = GATEWAY }) {
  const target = new URL(path, url)
  return new Promise((resolve, reject) => {
    const req = http.request(target, { method, headers, localAddress: from }, (res) => {
      let data = ''
      res.setEncoding('utf8')
      res.on('data', (chunk) => { data += chunk })
      res.on('end', () => {
        let parsed = data
        try { parsed = data ? JSON.parse(data) : null } catch {}
        resolve({ status: res.statusCode, headers: res.headers, body: parsed })
      })
    })
    req.on('error', reject)
    if (body !== undefined) req.end(typeof body === 'string' ? body : JSON.stringify(body))
    else req.end()
  })
}

/** POST /rest/v1/rpc/<fn> in schema quota, as PostgREST clients call functions. */
export async function rpc (fn, args, { token, from, url } = {}) {
  const apikey = await anonKey()
  return request({
    method: 'POST',
    path: `/rest/v1/rpc/${fn}`,
    headers: {
      apikey,
      Authorization: `Bearer ${token ?? apikey}`,
      'Content-Type': 'application/json',
      'Content-Profile': 'quota',
      'Accept-Profile': 'quota'
    },
    body: args,
    from,
    url
  })
}

/** One statement through psql as the superuser, in the database PostgREST serves; its output. */
export function sql (statement) {
  return execFileSync(`${env('QUOTA_EXT_PG_BIN')}/psql`, [
    '-X', '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', env('QUOTA_EXT_TEST_PORT'),
    '-U', 'postgres', '-d', env('QUOTA_EXT_HTTP_DB'), '-c', statement
  ], { encoding: 'utf8' }).trim()
}

/** A name no other test (or earlier run) uses. */
let n = 0
export const unique = (prefix) => `${prefix}-${process.pid}-${Date.now()}-${++n}`
