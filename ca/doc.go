// Package ca is Wicket's built-in certificate authority. It embeds smallstep's step-ca
// (authority.NewEmbedded with our own keys, and step-ca's own HTTP handlers), so the
// sign/renew/revoke/ACME protocols are step-ca's and any ACME client works against it.
//
// What it does:
//   - First start on an empty data dir creates an ECDSA P-256 root (10 y), an
//     intermediate (5 y) and one JWK provisioner key per role, all encrypted at rest
//     with the CA password (PKCS#8, AES-256-CBC, PBKDF2). Later starts load them; a
//     wrong password, or a missing or corrupt file, is one clear error and nothing is
//     written.
//   - One-time bootstrap tokens (MintToken) for agents and users. Each role has its own
//     JWK provisioner ("wicket-agent", "wicket-user") with its own lifetime and an X.509
//     template that refuses any SAN other than one SPIFFE ID of that role whose name is
//     the token subject: a user token can never yield an agent identity. step-ca refuses
//     a CSR whose SANs differ from the token's.
//   - Renewal over mTLS (/1.0/renew), revocation by serial or identity, an in-memory
//     revocation set for the per-handshake check (VerifyPeer, IsRevoked), a CRL.
//   - The gateway's own TLS server certificate, issued through step-ca at New and
//     renewed in-process at about 2/3 of its lifetime, served by GetCertificate.
//   - The ACME provisioner "acme" (/acme/acme/directory) restricted to an allow-list of
//     names, with optional External Account Binding (NewEABKey).
//   - Client helpers for agents and users (InspectToken, Enroll, Renew), so that no other
//     package imports step-ca.
//
// Single use of tokens. step-ca records a token's jti in its used_ott table
// (compare-and-swap) before signing. Two things are fixed here:
//
//  1. step's PostgreSQL driver implements compare-and-swap as SELECT ... FOR UPDATE
//     followed by an upsert; for a key that does not exist yet FOR UPDATE locks nothing,
//     so two concurrent requests with the same token could both "win" and both get a
//     certificate. With PostgreSQL we wrap step's driver (pgAtomic) so that a swap from
//     "absent" is a single INSERT ... ON CONFLICT DO NOTHING (one winner, decided by the
//     primary key) and a swap from a value is a single UPDATE ... WHERE nvalue = old; the
//     ACME nonce consumption (Get+Delete) becomes DELETE ... RETURNING. The concurrency
//     tests send one token from 20 goroutines to bbolt and PostgreSQL and expect
//     exactly one certificate.
//  2. step-ca records the jti before it verifies the signature and expiry, so a forged
//     copy of a token (same jti, altered signature) would burn the real one. Our
//     database wrapper does not record a token that step-ca is certain to refuse (bad
//     signature under the provisioner key, or expired beyond step-ca's leeway), and
//     the HTTP guard refuses such tokens before step-ca sees them, with a precise
//     message. A valid token presented with a bad CSR (other or extra SANs) IS
//     consumed: its holder is hostile or broken, and a new token is needed.
//
// Tokens survive a restart (step-ca's "issued before the CA started" check is off):
// single use is enforced by the database, which persists.
//
// Revocation status is kept in memory (loaded at start, updated by every revocation
// made through this process, including HTTP /revoke), so IsRevoked and VerifyPeer
// never touch the database. Gateways sharing PostgreSQL reload it every
// Config.RevocationSync (2s) and fire OnRevoke for revocations made elsewhere.
//
// What it must NOT do: know about sessions, policy, users' resources or the gateway's
// listener; log a token, key or password; write key material anywhere but DataDir
// (it does not use step's pki package, which writes to $STEPPATH); overwrite an
// existing CA.
package ca
