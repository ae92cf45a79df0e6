// A resource server for tokend's DPoP tests (RFC 9449 §7), written with jose (a
// maintained JOSE library; oidc-provider's own dependency, so in the same node_modules):
// every request must carry `Authorization: DPoP <token>` and a `DPoP` proof, checked in
// full: the proof's signature by the public key in its own header (typ dpop+jwt), htm,
// htu (this server's URL of the request, without query), iat within 60 s, ath (the
// token's SHA-256), a jti never seen before, this server's current nonce (else 401
// `use_dpop_nonce` with a `DPoP-Nonce`), and the token itself: a JWT access token
// (RFC 9068) signed by the issuer's keys, whose cnf.jkt is the proof key's thumbprint.
//
//   node resource.mjs ISSUER BASE_PATH
//
// Prints "READY <port>"; answers 200 {"ok":true,"sub","jkt"} or 401 {"error", "why"}.
// GET /test/stats: {"ok": n, "refused": n}.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

const modules = process.env.OIDC_PROVIDER_MODULES;
const jose = await import(pathToFileURL(path.join(modules, 'jose', 'dist', 'node', 'esm', 'index.js')).href);

const [issuer] = process.argv.slice(2);
const jwks = jose.createRemoteJWKSet(new URL(`${issuer}/jwks`));
const seen = new Set();
const nonce = crypto.randomBytes(16).toString('base64url');
const stats = { ok: 0, refused: 0 };

async function check(req, url) {
  const auth = req.headers.authorization ?? '';
  const proof = req.headers.dpop;
  if (!auth.startsWith('DPoP ') || typeof proof !== 'string') {
    return ['invalid_token', 'no DPoP Authorization or no DPoP proof'];
  }
  const token = auth.slice(5);
  let verified;
  try {
    verified = await jose.jwtVerify(proof, jose.EmbeddedJWK, {
      typ: 'dpop+jwt',
      algorithms: ['ES256', 'ES384', 'RS256', 'PS256'],
    });
  } catch (e) {
    return ['invalid_dpop_proof', `signature: ${e.message}`];
  }
  const { payload, protectedHeader } = verified;
  const htu = `${url.origin}${url.pathname}`;
  const now = Math.floor(Date.now() / 1000);
  const ath = crypto.createHash('sha256').update(token).digest('base64url');
  if (payload.htm !== req.method) return ['invalid_dpop_proof', `htm ${payload.htm}`];
  if (payload.htu !== htu) return ['invalid_dpop_proof', `htu ${payload.htu} is not ${htu}`];
  if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > 60) {
    return ['invalid_dpop_proof', `iat ${payload.iat}`];
  }
  if (payload.ath !== ath) return ['invalid_dpop_proof', 'ath'];
  if (payload.nonce !== nonce) return ['use_dpop_nonce', 'nonce'];
  if (typeof payload.jti !== 'string' || seen.has(payload.jti)) {
    return ['invalid_dpop_proof', `jti replayed: ${payload.jti}`];
  }
  let claims;
  try {
    ({ payload: claims } = await jose.jwtVerify(token, jwks, { issuer }));
  } catch (e) {
    return ['invalid_token', `access token: ${e.message}`];
  }
  const jkt = await jose.calculateJwkThumbprint(protectedHeader.jwk, 'sha256');
  if (claims.cnf?.jkt !== jkt) {
    return ['invalid_token', `cnf.jkt ${claims.cnf?.jkt} is not the proof key ${jkt}`];
  }
  seen.add(payload.jti);
  return [null, { sub: claims.sub ?? claims.client_id, jkt }];
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, `http://${req.headers.host}`);
  if (url.pathname === '/test/stats') {
    res.end(JSON.stringify(stats));
    return;
  }
  const [error, info] = await check(req, url);
  if (error) {
    stats.refused += 1;
    res.statusCode = 401;
    res.setHeader('WWW-Authenticate', `DPoP error="${error}"`);
    res.setHeader('DPoP-Nonce', nonce);
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ error, why: info }));
    return;
  }
  stats.ok += 1;
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ ok: true, ...info }));
});
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`READY ${server.address().port}\n`);
});
