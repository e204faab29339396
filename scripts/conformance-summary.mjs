// Summarizes results of the public RFC 9111 suite (http-cache-tests) for several caches, with
// the suite's own rules (lib/display.mjs determineTestResult): a test fails when it fails
// or when a test it depends on did not pass. Usage:
//   node conformance-summary.mjs SUITE_DIR name=results.json [name=results.json ...]
import fs from 'fs'
import path from 'path'
import { pathToFileURL } from 'url'

const [suiteDir, ...runs] = process.argv.slice(2)
const load = async p => (await import(pathToFileURL(path.join(suiteDir, p)).href)).default
const suites = await load('tests/index.mjs')
suites.push(await load('tests/surrogate-control.mjs'))
const tests = new Map()
for (const s of suites) for (const t of s.tests) tests.set(t.id, { ...t, suite: s.id })

function outcome (id, results, seen = new Set()) {
  const test = tests.get(id)
  const r = results[id]
  if (r === undefined) return 'untested'
  if (test.depends_on && !seen.has(id)) {
    seen.add(id)
    for (const dep of test.depends_on) {
      if (!['pass', 'yes'].includes(outcome(dep, results, seen))) return 'dependency'
    }
  }
  if (Array.isArray(r) && r[0] === 'Setup') return 'setup'
  if (test.kind === 'check') return r === true ? 'yes' : 'no'
  if (r === true) return 'pass'
  return test.kind === 'optimal' ? 'optional_fail' : 'required_fail'
}

// Groups that do not apply to an application cache.
const notApplicable = new Set(['surrogate-control'])
const rows = []
const failures = {}
for (const run of runs) {
  const [name, file] = run.split('=')
  const results = JSON.parse(fs.readFileSync(file, 'utf8'))
  const count = {}
  failures[name] = []
  for (const [id, t] of tests) {
    if (notApplicable.has(t.suite)) continue
    const o = outcome(id, results)
    count[o] = (count[o] || 0) + 1
    if (o === 'required_fail') failures[name].push(id)
  }
  rows.push([name, count])
}
const cols = ['pass', 'required_fail', 'optional_fail', 'dependency', 'setup', 'yes', 'no', 'untested']
console.log('| cache | ' + cols.join(' | ') + ' |')
console.log('|---|' + cols.map(() => '---:').join('|') + '|')
for (const [name, count] of rows) {
  console.log(`| ${name} | ` + cols.map(c => count[c] || 0).join(' | ') + ' |')
}
for (const [name, ids] of Object.entries(failures)) {
  console.log(`\n${name}: required failures: ${ids.join(', ') || 'none'}`)
}
