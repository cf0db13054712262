// The CouchDB-replication row of `clinicsync bench link`: PouchDB's own replicator
// (npm `pouchdb`) moving the workload between a local PouchDB and a pouchdb-server
// reached through the emulated link. Written out and run by the bench; prints one
// JSON line: {"elapsed_ms", "docs", "complete", "attempts", "stray"}.
//
//   node couch_replicate.js push|pull <local-dir> <remote-via-link> <remote-direct> \
//        <ndjson-or-"-"> <cap-seconds> <expected-docs>
//
// push: the workload (NDJSON, loaded into the local database before the clock
// starts) replicates to the remote. pull: the remote's documents replicate to an
// empty local database. A replication that fails (the link was cut) starts again at
// once from its checkpoint, as a live replication with retry would. The count of
// documents that arrived is read off the receiving side directly, not through the link.
const PouchDB = require('pouchdb');
const fs = require('fs');

const [mode, localDir, viaLink, direct, file, capArg, expectedArg] = process.argv.slice(2);

// A cut can reject one of PouchDB's own background requests (a checkpoint, an info
// call) where nothing awaits it; the replication it belonged to fails and is started
// again below, so such a rejection is noted, not fatal.
let stray = 0;
process.on('unhandledRejection', () => { stray += 1; });
process.on('uncaughtException', (e) => {
  if (e && (e.code === 'ECONNRESET' || e.type === 'system')) { stray += 1; return; }
  process.stderr.write(`couch_replicate: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
const capMs = Number(capArg) * 1000;
const expected = Number(expectedArg);

async function load(db, path) {
  const lines = fs.readFileSync(path, 'utf8').split('\n').filter((l) => l.length > 0);
  for (let i = 0; i < lines.length; i += 500) {
    const docs = lines.slice(i, i + 500).map((l) => {
      const r = JSON.parse(l);
      r._id = `${r.resourceType}/${r.id}`;
      return r;
    });
    await db.bulkDocs(docs);
  }
}

async function arrived(receiver) {
  const info = await receiver.info();
  return info.doc_count;
}

async function main() {
  const local = new PouchDB(localDir);
  if (mode === 'push' && file !== '-') {
    await load(local, file);
  }
  const remote = new PouchDB(viaLink, { skip_setup: true });
  const receiver = mode === 'push' ? new PouchDB(direct, { skip_setup: true }) : local;
  const started = Date.now();
  let attempts = 0;
  let docs = 0;
  let complete = false;
  while (!complete && (capMs === 0 || Date.now() - started < capMs)) {
    attempts += 1;
    const rep = mode === 'push'
      ? PouchDB.replicate(local, remote, { batch_size: 100 })
      : PouchDB.replicate(remote, local, { batch_size: 100 });
    let timer = null;
    if (capMs > 0) {
      timer = setTimeout(() => rep.cancel(), Math.max(0, capMs - (Date.now() - started)));
    }
    try {
      await rep;
    } catch (e) {
      // A cut: go again from the checkpoint.
    }
    if (timer) clearTimeout(timer);
    docs = await arrived(receiver);
    complete = docs >= expected;
  }
  const elapsed = Date.now() - started;
  process.stdout.write(JSON.stringify({ elapsed_ms: elapsed, docs, complete, attempts, stray }) + '\n');
}

main().catch((e) => {
  process.stderr.write(`couch_replicate: ${e.stack || e}\n`);
  process.exit(1);
});
