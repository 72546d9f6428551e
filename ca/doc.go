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
//   - One-time bootstrap tokens (MintToken, valid for their ttl to the second, see
//     below) for agents and users. Each role has its own JWK provisioner
//     ("wicket-agent", "wicket-user") with its own lifetime and an X.509 template that
//     refuses any SAN other than one SPIFFE ID of that role whose name is the token
//     subject: a user token can never yield an agent identity. step-ca refuses a CSR
//     whose SANs differ from the token's.
//   - Renewal over mTLS (/1.0/renew), revocation by serial or identity, an in-memory
//     revocation set for the per-handshake check (VerifyPeer, IsRevoked), a CRL.
//   - The gateway's own TLS server certificate, issued through step-ca at New and
//     renewed in-process at about 2/3 of its lifetime, served by GetCertificate.
//   - The ACME provisioner "acme" (/acme/acme/directory) restricted to an allow-list of
//     names, with optional External Account Binding (NewEABKey).
//   - Client helpers for agents and users (InspectToken, Enroll, Renew, EnrollACME,
//     RenewACME), so that no other package imports step-ca.
//   - Agent enrollment and renewal by ACME, at /acme/agents/directory (Config.AgentACME).
//
// Agents by ACME. An agent only dials out, so no validator can reach it. The flow:
//
//  1. The administrator mints an ACMECredential (NewAgentACMECredential): the gateway
//     URL, the root fingerprint, the agent name and a fresh External Account Binding key
//     created for that name (NewAgentEABKey), with an expiry kept in our own table.
//  2. The agent pins the root and registers an account on the "agents" ACME provisioner
//     (EAB required). Before step-ca binds the key, the guard refuses an unknown, already
//     bound or expired key with a precise 401 (step-ca would answer a reused key with a
//     500 that ACME clients retry). step-ca binds the key to the account once (CAS in
//     the database); we record account -> key, because step's nosql store cannot look a
//     key up by account.
//  3. The agent orders <name>.agents.<td>. At new-order step-ca evaluates the account's
//     policy, which we derive from the key's name (acmeDB.GetExternalAccountKeyByAccountID):
//     exactly that one DNS name, no wildcard. An account bound to agent A cannot order
//     B's name, two names, or anything outside the agents domain; the provisioner's
//     policy also allows only *.agents.<td> (and, for the issued certificate, SPIFFE IDs
//     of the trust domain).
//  4. Only tls-alpn-01 is offered. The agent opens a TLS 1.3 connection to the gateway on
//     ACMEBindALPN and signs this TLS session's exporter with its ACME account key; the
//     gateway (ReadACMEBind, AgentACMEAccountByKey) keeps the connection bound to that
//     account and the name its key was created for. When the account POSTs its challenge,
//     step-ca verifies the JWS and that the account owns the challenge; the guard has put
//     that account's ID into a per-request validation client, which asks
//     AgentACMEConfig.Dial for a connection to the name FOR THAT ACCOUNT. The gateway hands
//     out only a connection bound to exactly that account and name, once. A connection
//     bound to another account, or none, is never used: the validation fails.
//  5. At finalize the "agents" template turns the one validated DNS name into the SPIFFE
//     ID spiffe://<td>/agent/<name> (plus the DNS name), client-auth EKU, agent lifetime:
//     the same identity VerifyPeer accepts from the token path. Renewal is a new order of
//     the same account, validated the same way.
//  6. Revoking any certificate of agent N (Revoke, RevokeIdentity, HTTP /revoke)
//     deactivates every agents-ACME account bound to N: an ACME order presents no
//     certificate, so without this a revoked agent could simply order a new one. Coming
//     back needs a new credential from the administrator.
//
// Why this holds: issuing for agent N needs (a) an account bound to an EAB key created
// for N by the administrator — the key is single use, expires, and its HMAC is known only
// to the credential's holder — and (b) a validation answered on a connection whose holder
// proved possession of that account's private key. Someone holding another agent's
// account gets neither the order (policy) nor the connection (binding). The refusals are
// reported through AgentACMEConfig.OnRefusal, issuances through OnIssued, for the audit.
// The separate "acme" provisioner for public names can never mint a Wicket identity.
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
//     signature under the provisioner key) or that we refuse (outside its validity
//     window, below), and the HTTP guard refuses such tokens before step-ca sees
//     them, with a precise message. A refused token is never burnt. A valid token
//     presented with a bad CSR (other or extra SANs) IS consumed: its holder is
//     hostile or broken, and a new token is needed.
//
// Validity of tokens. step-ca's JWK provisioner accepts a token up to a minute past
// its exp (and a minute before its nbf/iat). We check the window ourselves, by the
// CA's clock (Config.Now) with one second of leeway (tokenLeeway says why so little:
// the gateway that mints a token is the one that checks it), in the guard for
// /1.0/sign and in the database wrapper for any other route; so a token is valid
// for its ttl after minting, to the second. The refusal says when the token expired
// and how to mint another (TokenTimeError). The agents' ACME enrollment credentials
// keep their expiry in our own table (step-ca's EAB keys never expire) and are
// refused from that second on, by the same clock (checkAgentEAB).
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
