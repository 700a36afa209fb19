// A browser (Debian's Chromium, driven by playwright-core) on a page of another origin: it loads
// supabase-js, calls an RPC, and reads the rate-limit headers of the answer.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { chromium } from 'playwright-core'
import { anonKey, userToken, sql, unique, GATEWAY, PAGE } from './stack.mjs'

const CHROMIUM = process.env.QUOTA_EXT_CHROMIUM ?? '/usr/bin/chromium'

test('a browser page calls an RPC through supabase-js and reads the RateLimit headers', async () => {
  sql("SELECT quota.set_limit('free', 'api_calls', 'day', 1000000)")
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] })
  try {
    const page = await browser.newPage()
    const q = new URLSearchParams({ url: GATEWAY, key: await anonKey(), token: await userToken(unique('browser')) })
    await page.goto(`${PAGE}/index.html?${q}`)
    await page.waitForFunction(() => window.result !== undefined, null, { timeout: 20000 })
    const result = await page.evaluate(() => window.result)
    assert.equal(result.failed, undefined, result.failed)
    assert.equal(result.consume.status, 200, JSON.stringify(result.consume))
    assert.equal(result.consume.data.allowed, true)
    assert.equal(result.status, 200)
    for (const h of ['ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset', 'x-ratelimit-remaining']) {
      assert.ok(result.headers[h] !== null, `${h} visible to the page: ${JSON.stringify(result.headers)}`)
    }
    assert.ok(result.headers['content-type'], "PostgREST's own exposed headers still visible")
  } finally {
    await browser.close()
  }
})
