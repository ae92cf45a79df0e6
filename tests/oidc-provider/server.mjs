// A real authorization server for tokend's tests: panva's oidc-provider (pinned in
// package.json / package-lock.json, installed by install.sh into a cache directory whose
// node_modules is named by $OIDC_PROVIDER_MODULES), with the client_credentials grant,
// private_key_jwt and tls_client_auth client authentication, and discovery.
//
//   node server.mjs CONFIG.json
//
// CONFIG.json: { "ttl": seconds of an access token, "clients": [oidc-provider client
// metadata...], "tls": { "key", "cert", "ca" } (PEM file paths; optional), "https": {
// "key", "cert" } (optional: the issuer itself on https, no client certificate asked),
// "resource": "URI" (optional: a resource server, RFC 8707; a token request naming it
// gets a signed JWT access token (RS256, RFC 9068) with that audience, its keys at the
// issuer's jwks_uri), "dpop": { "nonce": bool } (optional: DPoP, RFC 9449, turned on;
// with "nonce" every token request needs a server nonce, `use_dpop_nonce` first) }.
//
// Serves, on 127.0.0.1 (ports chosen by the kernel):
// - http://127.0.0.1:P: the issuer. /.well-known/openid-configuration (oidc-provider's
//   own), /token, and for tokend's discovery tests:
//   /fhir/.well-known/smart-configuration (SMART App Launch 2.x, a static document
//   naming the token endpoint of the server it is asked on) and
//   /.well-known/oauth-authorization-server/as8414 (RFC 8414, for the issuer
//   http://127.0.0.1:P/as8414, whose openid-configuration is absent).
// - https://127.0.0.1:Q (with "tls"): the same, behind TLS that requires a client
//   certificate signed by tls.ca (mutual TLS, RFC 8705), for tls_client_auth.
// - GET /test/refresh_token?client_id=C: a refresh token of a grant made for client C
//   (the refresh_token grant's seed, without a browser).
// - GET /test/log: every token request so far, as JSON lines of
//   {"client_id", "status", "error", "tls"}, and GET /test/issued: the access tokens
//   issued so far (so tests can tell that a token is this server's).
//
// Prints "READY <P> <Q>" on stdout once both listen; runs until killed.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

const modules = process.env.OIDC_PROVIDER_MODULES;
if (!modules) {
  console.error('server.mjs: OIDC_PROVIDER_MODULES (the node_modules install.sh made) is not set');
  process.exit(2);
}
const { default: Provider, errors } = await import(
  pathToFileURL(path.join(modules, 'oidc-provider', 'lib', 'index.js')).href
);

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

function listen(server) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server.address().port));
  });
}

const plain = config.https
  ? https.createServer({
    key: fs.readFileSync(config.https.key),
    cert: fs.readFileSync(config.https.cert),
  })
  : http.createServer();
const port = await listen(plain);
const issuer = `${config.https ? 'https' : 'http'}://127.0.0.1:${port}`;

// A resource server's JWT access tokens are signed with a key made for this run.
const resourceServer = config.resource
  ? (() => {
    const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'tokend-test', use: 'sig', alg: 'RS256' };
    return {
      jwks: { keys: [jwk] },
      info: (ctx, resource) => {
        if (resource !== config.resource) {
          throw new errors.InvalidTarget(`no resource server ${resource}`);
        }
        return {
          scope: 'api',
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: config.ttl,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    };
  })()
  : undefined;

const log = [];
const issued = [];

function peerCertificate(ctx) {
  const socket = ctx.req.socket;
  if (typeof socket.getPeerCertificate !== 'function') {
    return undefined;
  }
  const peer = socket.getPeerCertificate();
  return peer && peer.raw ? new crypto.X509Certificate(peer.raw) : undefined;
}

const provider = new Provider(issuer, {
  clients: config.clients,
  clientAuthMethods: ['private_key_jwt', 'tls_client_auth', 'client_secret_basic'],
  enabledJWA: {
    clientAuthSigningAlgValues: ['RS256', 'RS384', 'ES256', 'ES384'],
    dPoPSigningAlgValues: ['ES256', 'ES384', 'RS256', 'PS256'],
  },
  features: {
    clientCredentials: { enabled: true },
    ...(config.dpop && {
      dPoP: {
        enabled: true,
        nonceSecret: crypto.randomBytes(32),
        requireNonce: () => Boolean(config.dpop.nonce),
      },
    }),
    ...(resourceServer && {
      resourceIndicators: {
        enabled: true,
        getResourceServerInfo: resourceServer.info,
      },
    }),
    devInteractions: { enabled: false },
    mTLS: {
      enabled: true,
      tlsClientAuth: true,
      getCertificate: peerCertificate,
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches(ctx, property, expected) {
        const cert = peerCertificate(ctx);
        return property === 'tls_client_auth_subject_dn'
          && cert !== undefined
          && cert.subject.split('\n').join(',') === expected;
      },
    },
  },
  ...(resourceServer && { jwks: resourceServer.jwks }),
  // offline_access turns the refresh_token grant on (`/test/refresh_token`).
  scopes: ['system/*.read', 'offline_access'],
  // Every ttl set: a default's NOTICE would go to stdout.
  ttl: {
    ClientCredentials: config.ttl, AccessToken: config.ttl, Grant: 86400, RefreshToken: 86400,
  },
});

provider.on('client_credentials.saved', (token) => issued.push(token.jti));

// Test routes and the log of token requests, before oidc-provider's own routes.
provider.use(async (ctx, next) => {
  if (ctx.path === '/test/log') {
    ctx.body = log;
    return;
  }
  if (ctx.path === '/test/issued') {
    ctx.body = issued;
    return;
  }
  const base = `${ctx.req.socket.encrypted ? 'https' : 'http'}://${ctx.host}`;
  if (ctx.path === '/fhir/.well-known/smart-configuration') {
    ctx.body = {
      token_endpoint: `${base}/token`,
      token_endpoint_auth_methods_supported: ['private_key_jwt', 'tls_client_auth'],
      token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
      grant_types_supported: ['client_credentials'],
      scopes_supported: ['system/*.read'],
      capabilities: ['client-confidential-asymmetric'],
    };
    return;
  }
  if (ctx.path === '/test/refresh_token') {
    // A refresh token of a grant made for the test (as if the user had consented),
    // for the client named in the query: what a refresh_token account starts from.
    let client;
    try {
      client = await provider.Client.find(ctx.query.client_id);
    } catch (e) {
      ctx.status = 400;
      ctx.body = { error: e.message, error_description: e.error_description };
      return;
    }
    const grant = new provider.Grant({ accountId: 'alice', clientId: client.clientId });
    grant.addOIDCScope('offline_access');
    if (config.resource) grant.addResourceScope(config.resource, 'api');
    const grantId = await grant.save();
    const rt = new provider.RefreshToken({
      client,
      accountId: 'alice',
      grantId,
      gty: 'authorization_code',
      authTime: Math.floor(Date.now() / 1000),
      scope: config.resource ? 'offline_access api' : 'offline_access',
      ...(config.resource && { resource: config.resource }),
    });
    ctx.body = { refresh_token: await rt.save() };
    return;
  }
  if (ctx.path === '/.well-known/oauth-authorization-server/as8414') {
    ctx.body = { issuer: `${base}/as8414`, token_endpoint: `${base}/token` };
    return;
  }
  await next();
  if (ctx.path === '/token') {
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    log.push({
      client_id: ctx.oidc?.client?.clientId ?? null,
      status: ctx.status,
      error: body.error ?? null,
      error_description: body.error_description ?? null,
      tls: Boolean(ctx.req.socket.encrypted),
    });
  }
});

plain.on('request', provider.callback());

let tlsPort = 0;
if (config.tls) {
  const secure = https.createServer({
    key: fs.readFileSync(config.tls.key),
    cert: fs.readFileSync(config.tls.cert),
    ca: fs.readFileSync(config.tls.ca),
    requestCert: true,
    rejectUnauthorized: true,
  });
  secure.on('request', provider.callback());
  tlsPort = await listen(secure);
}

process.stdout.write(`READY ${port} ${tlsPort}\n`);
