// Builds dist/: one self-contained ES module (esbuild bundles src/) and its declarations (tsc, which
// also type-checks). `node build.mjs --check` builds into a scratch folder instead and fails when the
// committed dist/ differs from it, so dist/ cannot go stale.

import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);
const esbuild = require('esbuild');
const { version } = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8'));

function build(out) {
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out, { recursive: true });
  const tsc = spawnSync(process.execPath, [require.resolve('typescript/bin/tsc'), '-p', join(here, 'tsconfig.json'), '--outDir', out], {
    stdio: 'inherit',
  });
  if (tsc.status !== 0) throw new Error('tsc failed');
  esbuild.buildSync({
    absWorkingDir: here,
    entryPoints: ['src/herald-client.ts'],
    outfile: join(out, 'herald-client.js'),
    bundle: true,
    format: 'esm',
    target: 'es2020',
    platform: 'browser',
    charset: 'utf8',
    legalComments: 'none',
    logLevel: 'warning',
    banner: {
      js: `// herald-client ${version}: Herald's browser client (MIT OR Apache-2.0).\n// Built from clients/js/src by clients/js/build.mjs: edit the sources, not this file.`,
    },
  });
}

function files(dir) {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => join(entry.parentPath ?? entry.path, entry.name).slice(dir.length + 1))
    .sort();
}

const dist = join(here, 'dist');
if (process.argv.includes('--check')) {
  const scratch = mkdtempSync(join(tmpdir(), 'herald-client-build-'));
  try {
    build(scratch);
    const built = files(scratch);
    const committed = files(dist);
    const problems = [];
    for (const name of new Set([...built, ...committed])) {
      if (!built.includes(name)) problems.push(`dist/${name} is not built from the sources any more`);
      else if (!committed.includes(name)) problems.push(`dist/${name} is missing`);
      else if (!readFileSync(join(scratch, name)).equals(readFileSync(join(dist, name)))) {
        problems.push(`dist/${name} differs from a fresh build`);
      }
    }
    if (problems.length) {
      console.error(`${problems.join('\n')}\nRun \`npm run build\` in clients/js and commit dist/.`);
      process.exit(1);
    }
    console.log(`dist/ matches a fresh build (${built.length} files)`);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
} else {
  build(dist);
  console.log(`built ${files(dist).map((f) => 'dist/' + f).join(', ')}`);
}
